"""Issue 11 item 6: what a client can make the HTTP server hold is bounded. A real
:class:`HttpServer` on 127.0.0.1, raw sockets for idle and slowloris clients, real WebSocket
clients (aiohttp) and a raw one that never reads."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric

from tests.conftest import wait_for_condition
from tests.rawsock import closed_by_server, trickled_until_closed
from tgdaemon.http import (
    ACCESS_LOG_RATE,
    REGISTRY,
    SUBSCRIPTIONS,
    HttpLimits,
    HttpServer,
    LineBudget,
    StatusEncoder,
    build_app,
)
from tgdaemon.httpsend import OUTBOX, PIPELINED
from tgdaemon.status import State, StatusBoard

FAST = HttpLimits(max_connections=16, request_timeout=0.5, keepalive_timeout=0.5,
                  max_subscribers=2, send_timeout=1.0)


class Served:
    def __init__(self, server: HttpServer, board: StatusBoard, app: Any) -> None:
        self.server = server
        self.board = board
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def connect(self) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.server.port))
        return sock


@pytest.fixture
async def serve() -> AsyncIterator[Any]:
    started: list[HttpServer] = []

    async def start(limits: HttpLimits = FAST, accounts: int = 0) -> Served:
        board = StatusBoard()
        for i in range(accounts):
            board.update(f"account{i:05d}", state=State.NEEDS_LOGIN,
                         reason=f"no session: run `tgdaemon login account{i:05d}`")
        app = build_app(board=board, registry=CollectorRegistry(), ready=lambda: True,
                        limits=limits)
        server = HttpServer(app, "127.0.0.1", 0)
        await server.start()
        started.append(server)
        return Served(server, board, app)

    yield start
    for server in started:
        await server.stop()


async def test_idle_connections_are_closed(serve):
    served = await serve()
    started = time.monotonic()
    socks = [await served.connect() for _ in range(11)]
    try:
        for sock in socks:
            assert await closed_by_server(sock) == b""
    finally:
        for sock in socks:
            sock.close()
    elapsed = time.monotonic() - started
    assert FAST.request_timeout <= elapsed < 5, elapsed


async def test_a_slowly_sent_request_head_is_cut_off(serve):
    # Only the head timer may cut it off (aiohttp's keep-alive timer would too, at 0.5 s).
    served = await serve(dataclasses.replace(FAST, keepalive_timeout=30))
    sock = await served.connect()
    started = time.monotonic()
    try:
        assert await trickled_until_closed(
            sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n") == b""
    finally:
        sock.close()
    assert FAST.request_timeout <= time.monotonic() - started < 5


async def test_an_idle_keepalive_connection_is_closed(serve):
    served = await serve()
    sock = await served.connect()
    try:
        await asyncio.get_running_loop().sock_sendall(
            sock, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = await closed_by_server(sock)
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_a_request_head_has_at_most_32_header_lines(serve):
    """aiohttp allows 128 lines of up to 8 KiB: ~2 MB in the process per connection, held
    for up to the head timeout (200 connections: +400 MB)."""
    served = await serve(HttpLimits(request_timeout=5))

    async def status(lines: int) -> bytes:
        sock = await served.connect()
        try:
            extra = "".join(f"X-Filler-{i}: {'a' * 100}\r\n" for i in range(lines - 1))
            await asyncio.get_running_loop().sock_sendall(sock, (
                f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n"
                "\r\n").encode())
            return (await closed_by_server(sock)).partition(b"\r\n")[0]
        finally:
            sock.close()

    assert await status(31) == b"HTTP/1.1 200 OK"
    assert (await status(33)).endswith(b" 400 Bad Request")


async def test_pipelined_requests_are_parsed_one_ahead(serve):
    """aiohttp parses up to 32 pipelined requests ahead of the one being answered, each head
    held until its turn: behind a large answer the client does not read, ~8 MB per
    connection. One ahead: pipelining works, and what waits is one head."""
    served = await serve(HttpLimits(request_timeout=5, send_timeout=30), accounts=3000)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    # A large answer the client does not read yet, then 20 requests behind it.
    sock = await raw_get(served, "/status", then=request * 19 + request.replace(
        b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    try:
        await wait_for_condition(lambda: served.app[OUTBOX].sending == 1, 5, "the answer")
        assert len(only_handler(served)._messages) <= PIPELINED
        # Reading now: every answer comes, in order.
        answers = await closed_by_server(sock, 20)
    finally:
        sock.close()
    assert answers.startswith(b"HTTP/1.1 200 OK")
    assert answers.count(b"HTTP/1.1 200 OK") == 21


def only_handler(served: Served) -> Any:
    runner = served.server._runner
    assert runner is not None
    assert runner.server is not None
    (handler,) = runner.server.connections
    return handler


async def test_connections_beyond_the_cap_get_503_and_are_closed(serve, caplog):
    caplog.set_level(logging.WARNING, "tgdaemon.http")
    served = await serve(HttpLimits(max_connections=3, request_timeout=30))
    held = [await served.connect() for _ in range(3)]
    try:
        async with aiohttp.ClientSession() as http:
            async def status() -> int:
                async with http.get(served.url + "/healthz") as resp:
                    return resp.status

            # The three held sockets were accepted (and count) before the next one.
            await wait_for_condition(
                lambda: len(served.app[SUBSCRIPTIONS]) == 0 and served_connections(served) == 3,
                5, "three connections open")
            assert await status() == 503
            assert "HTTP connection refused: 3 open (the limit); 1 refused so far" \
                in caplog.text
            held.pop().close()
            await wait_for_condition(lambda: served_connections(served) < 3, 5)
            assert await status() == 200
    finally:
        for sock in held:
            sock.close()


async def test_a_burst_of_connections_up_to_the_cap_is_accepted(serve, caplog):
    """asyncio accepts up to 100 connections in one go; counting one both as accepted and as
    aiohttp's once its connection_made ran refused a burst of 200 at "256 open"."""
    caplog.set_level(logging.WARNING, "tgdaemon.http")
    clients = 150
    served = await serve(HttpLimits(max_connections=clients, request_timeout=30))
    # The kernel queue holds a burst up to the cap (aiohttp's 128 dropped handshakes beyond).
    assert listen_backlog(served.server.port) == clients

    def burst() -> list[socket.socket]:  # as fast as a thread can: batches on the server
        return [socket.create_connection(("127.0.0.1", served.server.port))
                for _ in range(clients)]

    async def busy_loop() -> None:  # a loaded daemon: connections pile up between iterations
        while True:
            until = time.monotonic() + 0.002
            while time.monotonic() < until:  # 2 ms of work per loop iteration
                pass
            await asyncio.sleep(0)

    busy = asyncio.create_task(busy_loop())
    try:
        socks = await asyncio.get_running_loop().run_in_executor(None, burst)
    finally:
        busy.cancel()
    try:
        await wait_for_condition(lambda: served_connections(served) == clients, 10,
                                 f"{clients} connections open")
        assert "HTTP connection refused" not in caplog.text
    finally:
        for sock in socks:
            sock.close()


def listen_backlog(port: int) -> int:
    """The listening socket's accept queue size (``ss`` shows it as Send-Q)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], check=True, capture_output=True,
                         text=True).stdout.split()
    return int(out[2])


def served_connections(served: Served) -> int:
    runner = served.server._runner
    assert runner is not None
    assert runner.server is not None
    return len(runner.server.connections)


async def test_websocket_subscribers_are_capped(serve, caplog):
    caplog.set_level(logging.WARNING, "tgdaemon.http")
    served = await serve()
    async with aiohttp.ClientSession() as http:
        first = await http.ws_connect(served.url + "/status/ws")
        second = await http.ws_connect(served.url + "/status/ws")
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await http.ws_connect(served.url + "/status/ws")
        assert info.value.status == 503
        for _ in range(5):
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await http.ws_connect(served.url + "/status/ws")
        # One line for six refusals (the first, then every 1,000th).
        assert caplog.text.count("status WebSocket subscriber refused: 2 open") == 1
        await first.close()
        await wait_for_condition(lambda: len(served.app[SUBSCRIPTIONS]) == 1, 5)
        async with http.ws_connect(served.url + "/status/ws") as third:
            assert (await third.receive_json(timeout=5))["type"] == "snapshot"
        await second.close()


async def test_a_subscriber_that_stops_reading_is_disconnected(serve, caplog):
    caplog.set_level(logging.INFO, "tgdaemon.http")
    # 30,000 accounts: a ~9 MB snapshot, more than the kernel buffers on both ends take.
    served = await serve(accounts=30_000)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", served.server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(sock, (
        "GET /status/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "\r\n").encode())
    try:
        await wait_for_condition(lambda: len(served.app[SUBSCRIPTIONS]) == 1, 5)
        await wait_for_condition(lambda: not served.app[SUBSCRIPTIONS], 10,
                                 "non-reading subscriber dropped")
        assert "subscriber stopped reading; disconnected it" in caplog.text
    finally:
        sock.close()
    # A reader is served as before.
    async with aiohttp.ClientSession() as http, http.ws_connect(
            served.url + "/status/ws", max_msg_size=0) as ws:
        snapshot = await ws.receive_json(timeout=20)
        assert len(snapshot["accounts"]) == 30_000
        served.board.update("account00000", state=State.CONNECTED)
        assert (await ws.receive_json(timeout=5))["state"] == "connected"


def test_a_status_is_encoded_once_whoever_receives_it():
    board = StatusBoard(clock=lambda: 0.0)
    encoder = StatusEncoder()
    alice = board.update("alice", state=State.CONNECTED)
    text = encoder.encode(alice)
    assert encoder.encode(alice) is text  # cached: same object, same text
    changed = board.update("alice", state=State.RECONNECTING)
    assert encoder.encode(changed) is not text
    assert b'"state": "reconnecting"' in encoder.encode(changed)
    board.update("bob", state=State.NEEDS_LOGIN)
    snapshot = encoder.snapshot(board.snapshot())
    assert snapshot.startswith(b'{"type": "snapshot", "accounts": [{"type": "status", '
                               b'"account": "alice"')
    # Nothing changed: every subscriber gets the same object, not a copy of its own.
    assert encoder.snapshot(board.snapshot()) is snapshot
    board.update("bob", state=State.CONNECTED)
    assert b'"connected"' in encoder.snapshot(board.snapshot())
    # The /status document: the same statuses behind a summary; one object while unchanged.
    document = encoder.document(board.summary(), board.snapshot())
    assert json.loads(document) == {"summary": board.summary(),
                                    "accounts": [s.to_json() for s in board.snapshot()]}
    assert encoder.document(board.summary(), board.snapshot()) is document
    board.note = "a note"
    assert json.loads(encoder.document(board.summary(), board.snapshot()))["summary"] \
        .endswith("; a note")
    board.remove("bob")
    encoder.snapshot(board.snapshot())
    assert len(encoder._cache) == 1  # removed accounts are forgotten


async def raw_get(served: Served, path: str, then: bytes = b"") -> socket.socket:
    """``GET path`` on a raw socket with the smallest receive buffer; the caller reads
    nothing (or reads what it wants); ``then``: requests pipelined behind. The buffer is set
    before connecting: shrunk later, the kernel drops what the larger window let in, and
    loopback's retransmissions stall."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", served.server.port))
    await loop.sock_sendall(
        sock, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode() + then)
    return sock


def answer_head(sock: socket.socket) -> bytes | None:
    """The answer's head, peeked (the client still reads nothing), or None before it came."""
    try:
        data = sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return None
    return data.partition(b"\r\n\r\n")[0] if b"\r\n\r\n" in data else None


async def test_large_answers_beyond_the_backlog_get_503_until_the_deadline_frees_it(
        serve, caplog):
    """A client takes a 1 MB /status answer and does not read: over a 256 KiB backlog, the
    next large answer is a 503 with Retry-After at once (a small one is served); at the send
    deadline the first client is cut off and large answers go out again."""
    caplog.set_level(logging.INFO, "tgdaemon.http")
    limits = HttpLimits(send_timeout=1.0, answer_backlog=256 * 1024)
    served = await serve(limits, accounts=3000)
    outbox = served.app[OUTBOX]
    stuck = await raw_get(served, "/status")
    try:
        await wait_for_condition(lambda: answer_head(stuck) is not None, 5, "the answer's head")
        head = answer_head(stuck)
        assert head is not None
        assert head.startswith(b"HTTP/1.1 200 ")
        assert outbox.held() > limits.answer_backlog
        async with aiohttp.ClientSession() as http:
            async with http.get(served.url + "/status") as resp:
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
            async with http.get(served.url + "/healthz") as resp:
                assert resp.status == 200
            # The first one is cut off at the deadline (it still reads nothing), which frees
            # the backlog.
            await wait_for_condition(lambda: outbox.sending == 0, 5, "the non-reader cut off")
            assert outbox.held() == 0
            async with http.get(served.url + "/status") as resp:
                assert resp.status == 200
                assert len((await resp.json())["accounts"]) == 3000
    finally:
        stuck.close()
    assert "large HTTP answer refused: clients that do not read hold 262144 bytes" in caplog.text
    assert "HTTP client disconnected: did not take a large answer within 1 s" in caplog.text


class BlockedCollector:
    """A registry's collector whose ``collect`` waits until released: a render in progress
    for as long as the test wants. Counts how often it was collected."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        self.entered.set()
        self.release.wait(10)
        family = GaugeMetricFamily("test_series", "many series", labels=("n",))
        for n in range(5000):
            family.add_metric((str(n),), n)
        yield family


async def test_concurrent_scrapes_share_one_render(serve):
    served = await serve()
    collector = BlockedCollector()
    served.app[REGISTRY].register(collector)
    url = served.url + "/metrics"
    headers = {"Accept-Encoding": "identity"}
    try:
        async with aiohttp.ClientSession() as http:
            async def scrape() -> bytes:
                async with http.get(url, headers=headers) as resp:
                    assert resp.status == 200
                    return await resp.read()

            first = asyncio.ensure_future(scrape())
            await asyncio.get_running_loop().run_in_executor(None, collector.entered.wait, 5)
            others = [asyncio.ensure_future(scrape()) for _ in range(4)]
            # Every request reached its handler while the first render is still running.
            await wait_for_condition(lambda: requests_in_progress(served) == 5, 5)
            collector.release.set()
            bodies = await asyncio.gather(first, *others)
    finally:
        collector.release.set()
    assert collector.calls == 1
    assert len(bodies[0]) > 64 * 1024  # a large answer: sent by the outbox
    assert all(body == bodies[0] for body in bodies)
    assert b'test_series{n="4999"} 4999.0' in bodies[0]


def requests_in_progress(served: Served) -> int:
    runner = served.server._runner
    assert runner is not None
    assert runner.server is not None
    return sum(1 for h in runner.server.connections if h._request_in_progress)


def test_access_log_lines_are_budgeted():
    now = [0.0]
    budget = LineBudget(2, lambda: now[0])
    assert [budget.take() for _ in range(4)] == [0, 0, None, None]  # a second's worth
    now[0] += 0.5
    assert [budget.take(), budget.take()] == [2, None]  # one line back: it says 2 skipped
    now[0] += 10
    assert [budget.take(), budget.take(), budget.take()] == [1, 0, None]  # full, never more


async def test_a_request_flood_writes_a_bounded_access_log(serve, caplog):
    caplog.set_level(logging.INFO, "tgdaemon.http.access")
    served = await serve()
    started = time.monotonic()
    async with aiohttp.ClientSession() as http:
        for _ in range(4 * ACCESS_LOG_RATE):
            async with http.get(served.url + "/healthz") as resp:
                assert resp.status == 200
        elapsed = time.monotonic() - started
        lines = caplog.text.count('"GET /healthz" status=200')
        assert lines <= ACCESS_LOG_RATE * (1 + elapsed) + 1, (lines, elapsed)

        async def logged() -> bool:  # the next request that gets a line says how many did not
            async with http.get(served.url + "/healthz"):
                return "access log: unlogged=" in caplog.text

        await wait_for_condition(logged, 5, "the unlogged count")
