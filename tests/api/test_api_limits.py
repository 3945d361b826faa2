"""What a local client of the account API can make the daemon hold is bounded, on the Unix
socket as on the TCP listener: connections, the time to send a request head and a body,
idle keep-alive; refusals are summarised in the log, tokens stay out of it.

The real :class:`AccountApi` (its aiohttp app on a real Unix socket, no workers: calls through
an account answer from its status), raw sockets for clients that misbehave."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import fnmatch
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from tests.conftest import wait_for_condition
from tests.rawsock import closed_by_server, trickled_until_closed
from tgdaemon.api.admission import StreamPlace, stream_place
from tgdaemon.api.events import EventKind, UpdateBuffer
from tgdaemon.api.service import WS_PROTOCOL, AccountApi
from tgdaemon.apiconfig import ApiClient
from tgdaemon.config import ConfigHolder, load_config
from tgdaemon.crypto import generate_keyring
from tgdaemon.http import HttpServer, build_app
from tgdaemon.httpsite import HttpLimits
from tgdaemon.lifecycle import State
from tgdaemon.status import StatusBoard

HASH = "0123456789abcdef0123456789abcdef"
TOKEN = "api-limits-Token-0123456789"
OTHER_TOKEN = "api-limits-Other-0123456789"
FAST = HttpLimits(max_connections=4, request_timeout=0.5, keepalive_timeout=0.5,
                  send_timeout=1.0)


@dataclasses.dataclass
class Served:
    api: AccountApi
    path: Path

    async def connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, str(self.path))
        return sock

    def session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(self.path)))

    def connections(self) -> int:
        runner = self.api._unix
        assert runner is not None
        assert runner.server is not None
        return len(runner.server.connections)


Serve = Callable[..., Awaitable[Served]]


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Start the API on a Unix socket with the given limits; alice is parked (409)."""
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="tgdlim-"))
    started: list[AccountApi] = []

    async def start(limits: HttpLimits = FAST) -> Served:
        token = tmp_path / "t.token"
        token.write_text(TOKEN + "\n")
        os.chmod(token, 0o600)
        other = tmp_path / "other.token"
        other.write_text(OTHER_TOKEN + "\n")
        os.chmod(other, 0o600)
        path = sock_dir / "api.sock"
        cfg = tmp_path / "t.toml"
        cfg.write_text(f'[daemon]\nstate_dir = "{tmp_path}"\n'
                       f'[telegram]\napi_id = 1\napi_hash = "{HASH}"\n'
                       '[[accounts]]\nname = "alice"\n'
                       f'[api]\nunix_socket = "{path}"\n'
                       f'[[api.clients]]\nname = "ops"\ntoken_file = "{token}"\n'
                       'accounts = ["*"]\nmethods = "all"\n'
                       f'[[api.clients]]\nname = "other"\ntoken_file = "{other}"\n'
                       'accounts = ["*"]\nmethods = "read-only"\n')
        board = StatusBoard()
        board.update("alice", state=State.NEEDS_LOGIN, reason="no session")
        api = AccountApi(ConfigHolder(load_config(cfg, env={})), board, generate_keyring(),
                         CollectorRegistry(), limits=limits)
        await api.start()
        started.append(api)
        return Served(api, path)

    yield start
    for api in started:
        await api.stop()
    shutil.rmtree(sock_dir, ignore_errors=True)


AUTH = {"Authorization": f"Bearer {TOKEN}"}
REQUEST = b"GET /v1/accounts/alice HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer " \
    + TOKEN.encode() + b"\r\n\r\n"


async def test_unix_socket_connections_beyond_the_cap_get_503(serve: Serve, caplog) -> None:
    caplog.set_level(logging.WARNING, "tgdaemon.http")
    served = await serve(dataclasses.replace(FAST, max_connections=3, request_timeout=30))
    held = [await served.connect() for _ in range(3)]
    try:
        await wait_for_condition(lambda: served.connections() == 3, 5, "three connections")
        async with served.session() as http:
            async with http.get("http://localhost/v1/accounts/alice", headers=AUTH) as r:
                assert r.status == 503
            assert "API socket connection refused: 3 open (the limit); 1 refused so far" \
                in caplog.text
        # A refused client that sends its request only after the refusal still reads the 503
        # (on a Unix socket its write would fail once the server closed).
        runner = served.api._unix
        assert runner is not None
        (site,) = runner.sites
        late = await served.connect()
        try:
            await wait_for_condition(lambda: site.refusals.count == 2, 5, "the refusal")
            await asyncio.get_running_loop().sock_sendall(late, REQUEST)
            assert (await closed_by_server(late)).startswith(b"HTTP/1.1 503 ")
        finally:
            late.close()
        async with served.session() as http:
            held.pop().close()
            await wait_for_condition(lambda: served.connections() < 3, 5, "one closed")
            async with http.get("http://localhost/v1/accounts/alice", headers=AUTH) as r:
                assert r.status == 200
                assert (await r.json())["state"] == "needs_login"
    finally:
        for sock in held:
            sock.close()


async def test_unix_socket_idle_and_slow_request_heads_are_cut_off(serve: Serve) -> None:
    # Only the head timer may cut these off (the keep-alive timer would too, at 0.5 s).
    served = await serve(dataclasses.replace(FAST, keepalive_timeout=30))
    idle, slow = await served.connect(), await served.connect()
    started = time.monotonic()
    try:
        assert await trickled_until_closed(
            slow, b"GET /v1/accounts HTTP/1.1\r\nHost: localhost\r\n") == b""
        assert await closed_by_server(idle) == b""
    finally:
        idle.close()
        slow.close()
    assert FAST.request_timeout <= time.monotonic() - started < 5


async def test_unix_socket_idle_keepalive_is_closed(serve: Serve) -> None:
    served = await serve(dataclasses.replace(FAST, request_timeout=30))
    sock = await served.connect()
    started = time.monotonic()
    try:
        await asyncio.get_running_loop().sock_sendall(sock, REQUEST)
        answer = await closed_by_server(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert time.monotonic() - started < 5


async def post_head(served: Served, length: int) -> socket.socket:
    sock = await served.connect()
    await asyncio.get_running_loop().sock_sendall(sock, (
        "POST /v1/accounts/alice/messages HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n").encode())
    return sock


async def test_a_request_body_must_arrive_within_the_deadline(serve: Serve, caplog) -> None:
    """A client that sends a head and part of the body held a handler for ever."""
    caplog.set_level(logging.INFO, "tgdaemon.http")
    served = await serve(dataclasses.replace(FAST, keepalive_timeout=30))
    sock = await post_head(served, 100)
    started = time.monotonic()
    try:
        await asyncio.get_running_loop().sock_sendall(sock, b'{"peer": "me", ')
        answer = await closed_by_server(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"did not arrive within 0.5 s" in answer
    assert FAST.request_timeout <= time.monotonic() - started < 5
    assert "account API request cut off: its body did not arrive within the request " \
        "deadline; 1 cut off so far" in caplog.text


async def test_a_body_in_pieces_is_read_whole(serve: Serve) -> None:
    """One read of the body returned what had arrived: a body in two pieces was "not JSON"."""
    served = await serve(dataclasses.replace(FAST, request_timeout=30, keepalive_timeout=30))
    body = b'{"peer": "me", "text": "' + b"x" * 3000 + b'"}'
    sock = await post_head(served, len(body))
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, body[:10])
        await asyncio.sleep(0.2)  # pacing the client: the first piece is read alone
        await loop.sock_sendall(sock, body[10:])
        head = await loop.sock_recv(sock, 65536)
    finally:
        sock.close()
    assert head.startswith(b"HTTP/1.1 409 "), head  # parsed, validated, alice is parked


async def test_a_body_beyond_the_limit_is_refused_and_the_connection_closed(
        serve: Serve) -> None:
    served = await serve(dataclasses.replace(FAST, request_timeout=1, keepalive_timeout=30))
    sock = await post_head(served, 10 * 1024 * 1024)
    started = time.monotonic()
    try:
        answer = await closed_by_server(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"body larger than 65536 bytes" in answer
    assert time.monotonic() - started < 5  # what is left of it is dropped for 1 s at most


def ws_headers(protocols: str | None = None) -> bytes:
    extra = f"Sec-WebSocket-Protocol: {protocols}\r\n" if protocols else ""
    return ("GET /v1/updates HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n{extra}\r\n"
            ).encode()


async def test_update_streams_are_capped_with_one_summarised_line(serve: Serve, caplog) -> None:
    caplog.set_level(logging.WARNING, "tgdaemon.http")
    served = await serve(dataclasses.replace(FAST, max_subscribers=2, request_timeout=30,
                                             keepalive_timeout=30))
    async with served.session() as http:
        streams = [await http.ws_connect("http://localhost/v1/updates", headers=AUTH)
                   for _ in range(2)]
        try:
            for _ in range(3):
                async with http.get("http://localhost/v1/updates", headers={
                        **AUTH, "Upgrade": "websocket", "Connection": "Upgrade",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                        "Sec-WebSocket-Version": "13"}) as r:
                    assert r.status == 429
                    assert r.headers["Retry-After"] == "5"
            assert caplog.text.count("account API update stream refused: 2 open (the limit)"
                                     ) == 1
            await streams.pop().close()
            await wait_for_condition(lambda: len(served.api._streams) == 1, 5, "one closed")
            streams.append(await http.ws_connect("http://localhost/v1/updates", headers=AUTH))
        finally:
            for ws in streams:
                await ws.close()


async def test_a_stream_consumer_that_stops_reading_is_disconnected(serve: Serve,
                                                                    caplog) -> None:
    caplog.set_level(logging.INFO, "tgdaemon.http")
    served = await serve(dataclasses.replace(FAST, send_timeout=1.0, request_timeout=30,
                                             keepalive_timeout=30))
    sock = await served.connect()
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, ws_headers())
        data = b""
        while b'"ready"' not in data:  # the 101 and the ready event; then it stops reading
            data += await loop.sock_recv(sock, 65536)
        assert data.startswith(b"HTTP/1.1 101 ")
        buffer = served.api.buffer
        text = "y" * 4000
        for i in range(300):  # ~1.2 MB: past every buffer on the way
            buffer.append("alice", EventKind.MESSAGE, {"message": {"id": i, "text": text}})
        await wait_for_condition(lambda: not served.api._streams, 10, "the stream closed")
        assert "account API update stream disconnected: the consumer did not take an " \
            "event within 1 s; 1 disconnected so far" in caplog.text
    finally:
        sock.close()


async def test_a_stream_offering_another_subprotocol_is_refused_and_its_token_not_logged(
        serve: Serve, caplog) -> None:
    """aiohttp logs every offered subprotocol when none is ours: the browser's token too."""
    caplog.set_level(logging.DEBUG)
    served = await serve()
    b64 = base64.urlsafe_b64encode(TOKEN.encode()).decode().rstrip("=")
    async with served.session() as http:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect("http://localhost/v1/updates", protocols=(f"bearer.{b64}",))
        assert refused.value.status == 400
        ws = await http.ws_connect("http://localhost/v1/updates",
                                   protocols=(WS_PROTOCOL, f"bearer.{b64}"))
        assert ws.protocol == WS_PROTOCOL
        await ws.close()
    assert b64 not in caplog.text
    assert TOKEN not in caplog.text
    assert "overlap" not in caplog.text


async def test_the_status_websocket_refuses_other_subprotocols_too(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    token = "status-Token-0123456789abc"
    app = build_app(board=StatusBoard(), registry=CollectorRegistry(), ready=lambda: True,
                    token=token)
    server = HttpServer(app, "127.0.0.1", 0)
    await server.start()
    b64 = base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
    try:
        async with aiohttp.ClientSession() as http:
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(f"http://127.0.0.1:{server.port}/status/ws",
                                      protocols=(f"bearer.{b64}",))
            assert refused.value.status == 400
    finally:
        await server.stop()
    assert b64 not in caplog.text
    assert token not in caplog.text


async def test_every_route_but_the_openapi_document_needs_a_token(serve: Serve,
                                                                  caplog) -> None:
    caplog.set_level(logging.DEBUG)
    served = await serve(dataclasses.replace(FAST, request_timeout=30, keepalive_timeout=30))
    runner = served.api._unix
    assert runner is not None
    routes = {(r.method, r.resource.canonical) for r in runner.app.router.routes()
              if r.resource is not None and r.method != "HEAD"}
    assert len(routes) == 11, routes
    async with served.session() as http:
        for method, path in sorted(routes):
            url = "http://localhost" + path.replace("{name}", "alice")
            for headers in ({}, {"Authorization": "Bearer not-" + TOKEN}):
                async with http.request(method, url, headers=headers, json={}) as r:
                    if path == "/v1/openapi.json":
                        assert r.status == 200
                    else:
                        assert r.status == 401, (method, path, r.status)
                        assert r.headers["WWW-Authenticate"] == 'Bearer realm="tgdaemon"'
    assert TOKEN not in caplog.text


async def test_a_plain_get_of_the_stream_is_a_400_not_a_logged_error(serve: Serve,
                                                                     caplog) -> None:
    """The failed handshake was an 'internal error': a 500 and an ERROR with a traceback,
    as often as a client liked."""
    caplog.set_level(logging.DEBUG)
    served = await serve()
    async with served.session() as http:
        for _ in range(3):
            async with http.get("http://localhost/v1/updates", headers=AUTH) as r:
                assert r.status == 400
                assert (await r.json())["message"] == "not a WebSocket handshake"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert not served.api._streams


@pytest.mark.parametrize("patterns", [("*",), ("alice",), ("shop-*", "a?ice"),
                                      ("[ab]*", "x"), ("shop-[!0-4]*",)])
def test_client_globs_match_like_fnmatchcase(patterns: tuple[str, ...]) -> None:
    client = ApiClient(name="c", token="t" * 16, token_file=Path("/t"), accounts=patterns)
    for name in ("alice", "Alice", "bob", "shop-1", "shop-7x", "x", "xx", "a.ice", "ali"):
        assert client.may_use(name) == any(fnmatch.fnmatchcase(name, p) for p in patterns)


async def test_a_stream_frame_from_the_consumer_is_at_most_4_kib(serve: Serve) -> None:
    served = await serve(dataclasses.replace(FAST, request_timeout=30, keepalive_timeout=30))
    async with served.session() as http:
        ws = await http.ws_connect("http://localhost/v1/updates", headers=AUTH)
        assert (await ws.receive_json())["type"] == "ready"
        await ws.send_str("x" * 5000)
        msg = await ws.receive(timeout=10)
        assert msg.type is aiohttp.WSMsgType.CLOSE
        assert msg.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        await ws.close()
    await wait_for_condition(lambda: not served.api._streams, 5, "the stream ended")


async def test_a_resuming_consumer_of_one_account_reads_only_its_rows(tmp_path: Path) -> None:
    """Resuming ``?accounts=alice`` scanned every account's held events (10 million at
    10,000 accounts) for alice's; counted in SQLite VM steps (the work, not the time)."""
    buffer = UpdateBuffer(tmp_path, generate_keyring(), 100_000)
    await buffer.open()
    try:
        for i in range(3000):
            buffer.append("bob", EventKind.MESSAGE, {"message": {"id": i}})
        buffer.append("alice", EventKind.MESSAGE, {"message": {"id": 1}})
        await buffer.flush()
        steps = 0

        def step() -> int:
            nonlocal steps
            steps += 1
            return 0

        assert buffer._db is not None
        buffer._db.set_progress_handler(step, 100)
        got = [e async for e in buffer.backlog(frozenset({"alice"}), 0, buffer.last_seq)]
        buffer._db.set_progress_handler(None, 100)
        assert [(e.account, e.body["message"]["id"]) for e in got] == [("alice", 1)]
        assert steps < 20, steps
        # Every account: all of them, in order.
        everything = [e async for e in buffer.backlog(None, 0, buffer.last_seq)]
        assert [e.seq for e in everything] == list(range(1, 3002))
    finally:
        await buffer.close()


async def test_undecryptable_held_events_are_one_summarised_line(tmp_path: Path,
                                                                 caplog) -> None:
    """Every resume reads the held events again: one WARNING per event that cannot be
    decrypted (its key left the ring) let a consumer write lines at will."""
    caplog.set_level(logging.WARNING, "tgdaemon.api.events")
    buffer = UpdateBuffer(tmp_path, generate_keyring(), 100)
    await buffer.open()
    for i in range(50):
        buffer.append("alice", EventKind.MESSAGE, {"message": {"id": i}})
    await buffer.close()
    buffer = UpdateBuffer(tmp_path, generate_keyring(), 100)  # another key: none decrypts
    await buffer.open()
    try:
        for _ in range(3):  # three resumes
            assert [e async for e in buffer.backlog(None, 0, buffer.last_seq)] == []
    finally:
        await buffer.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "tgdaemon.api.events"]
    assert lines == ["held update event skipped: it could not be decrypted (its key left the "
                     "ring); 1 skipped so far"], lines
    assert buffer.undecryptable.count == 150


async def test_a_live_event_is_encoded_once_for_every_stream(serve: Serve) -> None:
    """64 streams of every account encoded each event 64 times on the loop."""
    served = await serve(dataclasses.replace(FAST, request_timeout=30, keepalive_timeout=30))
    buffer = served.api.buffer
    async with served.session() as http:
        streams = [await http.ws_connect("http://localhost/v1/updates", headers=AUTH)
                   for _ in range(3)]
        try:
            for ws in streams:
                assert (await ws.receive_json())["type"] == "ready"
            event = buffer.append("alice", EventKind.MESSAGE, {"message": {"id": 7}})
            texts = [(await ws.receive(timeout=10)).data for ws in streams]
        finally:
            for ws in streams:
                await ws.close()
    assert texts == [texts[0]] * 3
    assert json.loads(texts[0])["message"] == {"id": 7}
    assert buffer.encoder.encode(event, buffer.epoch) is buffer.encoder.encode(event, buffer.epoch)


async def test_an_internal_error_logs_its_traceback_once(serve: Serve, caplog) -> None:
    """A client that found a bug wrote an ERROR with a traceback per request."""
    caplog.set_level(logging.INFO, "tgdaemon.api")
    served = await serve(dataclasses.replace(FAST, request_timeout=30, keepalive_timeout=30))
    served.api.board.update("alice", state=State.CONNECTED)

    def broken(name: str) -> Any:  # the supervisor's hook, failing as a bug would
        raise RuntimeError("a bug")

    served.api.bind(broken)
    async with served.session() as http:
        for _ in range(5):
            async with http.get("http://localhost/v1/accounts/alice/dialogs",
                                headers=AUTH) as r:
                assert r.status == 500
                assert (await r.json())["error"] == "error"
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == ["API dialogs failed: RuntimeError"]
    assert errors[0].exc_info is not None


@pytest.mark.parametrize(("held", "client", "place"), [
    ({}, "a", StreamPlace(True)),
    ({"a": 3}, "a", StreamPlace(True)),  # below the limit: anyone
    ({"a": 4}, "a", StreamPlace(False)),  # full, and a is the biggest
    ({"a": 4}, "b", StreamPlace(True, evict="a")),  # b holds none: a gives one up
    ({"a": 2, "b": 2}, "c", StreamPlace(True, evict="b")),  # ties: one victim, by name
    ({"a": 3, "b": 1}, "b", StreamPlace(True, evict="a")),  # 1 + 1 < 3
    ({"a": 2, "b": 2}, "b", StreamPlace(False)),  # even: nobody is over
    ({"a": 2, "b": 2}, "a", StreamPlace(False)),
])
def test_stream_share_table(held: dict[str, int], client: str, place: StreamPlace) -> None:
    assert stream_place(held, client, 4) == place


async def test_a_client_holding_every_stream_gives_one_up_for_another(serve: Serve,
                                                                       caplog) -> None:
    """One client could hold every stream and keep the others out (429 for as long as it
    liked)."""
    caplog.set_level(logging.INFO, "tgdaemon.http")
    served = await serve(dataclasses.replace(FAST, max_subscribers=2, request_timeout=30,
                                             keepalive_timeout=30))
    other = {"Authorization": f"Bearer {OTHER_TOKEN}"}
    async with served.session() as http:
        ops = [await http.ws_connect("http://localhost/v1/updates", headers=AUTH)
               for _ in range(2)]
        for ws in ops:
            assert (await ws.receive_json())["type"] == "ready"
        mine = await http.ws_connect("http://localhost/v1/updates", headers=other)
        try:
            assert (await mine.receive_json())["type"] == "ready"
            closed = await ops[1].receive(timeout=10)  # the newest of the biggest holder
            assert closed.type is aiohttp.WSMsgType.CLOSE
            assert closed.data == aiohttp.WSCloseCode.TRY_AGAIN_LATER
            assert closed.extra == "another client needs a stream: resume with your cursor"
            await wait_for_condition(lambda: len(served.api._streams) == 2, 5, "one closed")
            # Now even: neither gets a third.
            for headers in (AUTH, other):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect("http://localhost/v1/updates", headers=headers)
                assert refused.value.status == 429
            # The older stream of the first client still works.
            served.api.buffer.append("alice", EventKind.MESSAGE, {"message": {"id": 9}})
            assert (await ops[0].receive_json(timeout=10))["message"] == {"id": 9}
            assert (await mine.receive_json(timeout=10))["message"] == {"id": 9}
        finally:
            for ws in (*ops, mine):
                await ws.close()
    assert "account API update stream pushed out: another client needed one and held " \
        "fewer; 1 pushed out so far" in caplog.text
