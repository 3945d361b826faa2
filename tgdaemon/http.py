"""The HTTP side: ``/metrics``, ``/healthz``, ``/readyz``, ``/status``, ``/status/ws`` and ``/``.

Loopback by default (the daemon binds what the config says). Authentication is an optional
bearer token for the status endpoints (they name accounts and users): ``Authorization:
Bearer <token>``, or, for browsers that cannot set headers on a WebSocket, the subprotocol
``bearer.<base64url(token)>`` next to :data:`WS_PROTOCOL`. Query-string tokens are not
accepted: they end up in access logs. Tokens are compared with ``hmac.compare_digest`` and
never logged.

``/metrics`` is rendered in a dedicated worker thread (one scrape at a time) so a
10,000-account scrape does not stall heartbeats, and gzip-compressed when the scraper asks;
scrapes that arrive while one is rendered share its body.

Every route first checks the Host header against an allow-list (421 otherwise): a DNS-rebinding
page reaches 127.0.0.1 under its own host name. Everything an outsider can make the server hold
is bounded by :class:`HttpLimits`: connections, the time to send a request, idle keep-alive,
WebSocket subscribers, and what clients that stop reading may cost (their unsent data, in the
process and in the kernel), for WebSocket subscribers here and for large answers (``/metrics``,
``/status``, ``/v1/accounts``...) in :mod:`tgdaemon.httpsend`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import errno
import gzip
import hashlib
import hmac
import json
import logging
import operator
import os
import re
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import CollectorRegistry

from tgdaemon.exceptions import ConfigError
from tgdaemon.fdlimit import HTTP_SPARE_FDS, FdReserve
from tgdaemon.httpsend import (
    OUTBOX,
    SEND_BUFFER,
    Outbox,
    Refusals,
    bounded_answers,
    limit_send_buffer,
)
from tgdaemon.logvolume import FD_EXHAUSTED
from tgdaemon.metrics import render
from tgdaemon.status import AccountStatus, StatusBoard, Subscription

log = logging.getLogger("tgdaemon.http")


#: The WebSocket subprotocol the server speaks (and echoes back to browsers).
WS_PROTOCOL = "tgdaemon.status.v1"
#: Prefix of the subprotocol that carries the token from the status page.
WS_TOKEN_PREFIX = "bearer."
#: Close code for a subscriber that fell too far behind: reconnect for a fresh snapshot.
CLOSE_OVERFLOW = WSCloseCode.TRY_AGAIN_LATER  # 1013
#: Close code when the daemon shuts down.
CLOSE_SHUTDOWN = WSCloseCode.GOING_AWAY  # 1001

STATUS_PAGE = Path(__file__).with_name("static") / "status.html"
#: Host names answered when the caller gives no list (the daemon passes the config's).
DEFAULT_ALLOWED_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what clients can make the server hold. The defaults fit Prometheus, a few
    status pages and scripts with room to spare; they are not config keys (nobody tunes them).

    * ``max_connections``: open connections at once; one more gets a 503 and is closed.
    * ``request_timeout``: a connection must deliver a complete request head this soon after
      it opens (slowloris, idle sockets).
    * ``keepalive_timeout``: an idle keep-alive connection is closed after this long (and a
      slow next request head with it).
    * ``max_subscribers``: open ``/status/ws`` connections; one more gets a 503.
    * ``send_timeout``: a WebSocket message (the snapshot too), and a large answer
      (:data:`tgdaemon.httpsend.LARGE_ANSWER` bytes or more), must leave the process this
      soon; a client that does not read is disconnected, so its unsent data is freed.
      Prometheus gives up on a scrape after 10 s by default anyway.
    * ``subscriber_backlog``: unsent WebSocket data, in bytes, all subscribers together may
      hold in the process; a new subscriber whose snapshot does not fit gets a 503 (when
      nothing is held, one always fits). Without it 64 non-readers pin 64 snapshots (3.5 MB
      each at 10,000 accounts) for ``send_timeout``, again and again.
    * ``answer_backlog``: unsent bytes all large answers being sent may hold together (a body
      shared by several counts once); a new large answer that does not fit gets a 503 with
      ``Retry-After`` (when nothing is held, one always fits). Without it 256 clients that
      ask for ``/metrics`` or ``/status`` at 10,000 accounts and never read held ~1 GB.
    * ``send_buffer``: the kernel send buffer of a subscriber's socket and of one taking a
      large answer (Linux doubles it). The kernel would otherwise grow it up to
      ``net.ipv4.tcp_wmem``'s 4 MiB per non-reader, and whether it does depends on the
      machine's memory pressure.
    * ``max_headers``: header lines in one request (aiohttp's default is 128, each up to
      8 KiB: a head of ~1 MB, ~2 MB in the process until it is refused or its 10 s run out;
      200 connections doing that took +400 MB). Browsers send about 20, scripts fewer.
    * ``spare_fds``: descriptors held in reserve for when the process runs out (EMFILE):
      all but one serve a request each at a time, the last turns connections away with a 503
      (see :class:`_GuardedSite`). Part of :data:`tgdaemon.fdlimit.FIXED_FDS`.
    """

    max_connections: int = 256
    request_timeout: float = 10.0
    keepalive_timeout: float = 15.0
    max_subscribers: int = 64
    send_timeout: float = 10.0
    subscriber_backlog: int = 16 * 1024 * 1024
    answer_backlog: int = 32 * 1024 * 1024
    send_buffer: int = SEND_BUFFER
    max_headers: int = 32
    spare_fds: int = HTTP_SPARE_FDS


#: Access log lines per second at most (and a second's worth at once); requests beyond are
#: counted, and the next line that is written says how many went unlogged.
ACCESS_LOG_RATE = 50


class LineBudget:
    """A token bucket of log lines: whoever can reach the port must not decide how much the
    journal takes (journald drops a service's lines beyond its own rate limit, the daemon's
    important ones included)."""

    def __init__(self, rate: float, clock: Callable[[], float]) -> None:
        self.rate = rate
        self._clock = clock
        self._tokens = rate
        self._stamp = clock()
        self.skipped = 0

    def take(self) -> int | None:
        """None: do not log this one (counted). Else log it, after a line for the returned
        number of lines skipped since the last one (0: none)."""
        now = self._clock()
        self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens < 1.0:
            self.skipped += 1
            return None
        self._tokens -= 1.0
        skipped, self.skipped = self.skipped, 0
        return skipped


class AccessLogger(AbstractAccessLogger):
    """One line per request without the query string (a token pasted into a URL must not reach
    the journal) and without Referer/User-Agent (free text from the client), at most
    :data:`ACCESS_LOG_RATE` a second. :meth:`HttpServer.start` gives each server a subclass
    with a :class:`LineBudget` of its own (aiohttp makes one logger per connection)."""

    budget: LineBudget | None = None

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if self.budget is not None:
            skipped = self.budget.take()
            if skipped is None:
                return
            if skipped:
                self.logger.info("access log: unlogged=%d requests (more than %d a second)",
                                 skipped, ACCESS_LOG_RATE)
        query = "?[redacted]" if request.query_string else ""
        # key=value: bare runs of numbers ("200 7540 0.001") would look like a phone number
        # to the redactor.
        self.logger.info('%s "%s %s%s" status=%d bytes=%d time=%.3fs', request.remote,
                         request.method, request.path, query, response.status,
                         response.body_length, time)


class LoopLagMonitor:
    """Measures how late the event loop wakes a sleeping task: a blocked loop shows up here.

    One task sleeps ``interval`` seconds in a loop; the overshoot is the lag.
    """

    def __init__(self, interval: float = 1.0, window: int = 60) -> None:
        self.interval = interval
        self.last = 0.0
        self._recent: deque[float] = deque(maxlen=window)
        self._task: asyncio.Task[None] | None = None

    @property
    def worst_recent(self) -> float:
        return max(self._recent, default=0.0)

    @property
    def samples(self) -> int:
        return len(self._recent)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval)
            self.last = max(0.0, loop.time() - started - self.interval)
            self._recent.append(self.last)


_SNAPSHOT_HEAD = b'{"type": "snapshot", "accounts": '


class StatusEncoder:
    """Each status becomes UTF-8 JSON once, however many subscribers receive it; a snapshot is
    the cached encodings joined, and the same snapshot object while no status changed (so is
    the ``/status`` document: clients that ask at once share one body).
    Keyed by account, checked by identity: a changed status is a new object (the board
    replaces, never mutates)."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[AccountStatus, bytes]] = {}
        self._last: tuple[list[AccountStatus], bytes] = ([], b"")
        self._document: tuple[list[AccountStatus], str, bytes] = ([], "", b"")

    def encode(self, status: AccountStatus) -> bytes:
        cached = self._cache.get(status.account)
        if cached is not None and cached[0] is status:
            return cached[1]
        text = json.dumps(status.to_json()).encode()
        self._cache[status.account] = (status, text)
        return text

    def snapshot(self, statuses: list[AccountStatus]) -> bytes:
        last, data = self._last
        if data and len(last) == len(statuses) and all(map(operator.is_, last, statuses)):
            return data
        texts = [self.encode(s) for s in statuses]
        if len(self._cache) > len(statuses):  # accounts removed since: forget them
            keep = {s.account for s in statuses}
            self._cache = {k: v for k, v in self._cache.items() if k in keep}
        data = _SNAPSHOT_HEAD + b"[" + b", ".join(texts) + b"]}"
        self._last = (statuses, data)
        return data

    def document(self, summary: str, statuses: list[AccountStatus]) -> bytes:
        """The ``/status`` body: ``{"summary": ..., "accounts": [...]}``."""
        last, last_summary, data = self._document
        if (data and summary == last_summary and len(last) == len(statuses)
                and all(map(operator.is_, last, statuses))):
            return data
        snapshot = self.snapshot(statuses)
        # The snapshot's accounts, behind another head: one copy, no second encoding.
        accounts = memoryview(snapshot)[len(_SNAPSHOT_HEAD):]
        data = b"".join((b'{"summary": ', json.dumps(summary).encode(), b', "accounts": ',
                         accounts))
        self._document = (statuses, summary, data)
        return data


# -- typed application state -----------------------------------------------------------------

BOARD = web.AppKey("board", StatusBoard)
REGISTRY = web.AppKey("registry", CollectorRegistry)
READY: web.AppKey[Callable[[], bool]] = web.AppKey("ready")
TOKEN: web.AppKey[str | None] = web.AppKey("token")
WS_QUEUE_SIZE = web.AppKey("ws_queue_size", int)
LOOP_LAG = web.AppKey("loop_lag", LoopLagMonitor)
RENDER_EXECUTOR = web.AppKey("render_executor", ThreadPoolExecutor)
SUBSCRIPTIONS: web.AppKey[set[Subscription]] = web.AppKey("subscriptions")
PAGE = web.AppKey("page", bytes)
PAGE_CSP = web.AppKey("page_csp", str)
ALLOWED_HOSTS = web.AppKey("allowed_hosts", frozenset[str])
LIMITS = web.AppKey("limits", HttpLimits)
WS_REFUSALS = web.AppKey("ws_refusals", Refusals)
BACKLOG_REFUSALS = web.AppKey("backlog_refusals", Refusals)
#: Renders of /metrics in progress, plain (False) and gzip (True): scrapes meanwhile join them.
RENDERS: web.AppKey[dict[bool, asyncio.Future[bytes]]] = web.AppKey("renders")
#: The open subscribers' senders: what they hold unsent is summed against the backlog limit.
SENDERS: web.AppKey[set[_Sender]] = web.AppKey("senders")
ENCODER = web.AppKey("encoder", StatusEncoder)
#: Connections (by id) that have not yet sent a complete request head: the head timer closes
#: those still here when it fires; the first request takes its connection out.
UNSTARTED = web.AppKey("unstarted", dict[int, web.RequestHandler])
#: Connections (by handler id) accepted into a spare descriptor while the process is out of
#: them: one request each, no WebSocket, so that the spare comes back soon.
SPARE: web.AppKey[set[int]] = web.AppKey("spare")


def build_app(
    *,
    board: StatusBoard,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    token: str | None = None,
    ws_queue_size: int = 1024,
    loop_lag_interval: float = 1.0,
    allowed_hosts: Collection[str] = DEFAULT_ALLOWED_HOSTS,
    limits: HttpLimits = HttpLimits(),
) -> web.Application:
    """The aiohttp application; nothing runs until a runner starts it."""
    if token is not None and not token.strip():
        raise ConfigError("the HTTP token is empty: remove it or set a real one")
    # The outbox outermost: it sends what _guard and the routes answer.
    app = web.Application(middlewares=[bounded_answers, _guard])
    app[OUTBOX] = Outbox(backlog=limits.answer_backlog, timeout=limits.send_timeout,
                         socket_buffer=limits.send_buffer)
    app[RENDERS] = {}
    app[ALLOWED_HOSTS] = frozenset(_host_name(h) for h in allowed_hosts)
    app[LIMITS] = limits
    app[WS_REFUSALS] = Refusals("status WebSocket subscriber",
                                f"{limits.max_subscribers} open (the limit)")
    app[BACKLOG_REFUSALS] = Refusals(
        "status WebSocket subscriber",
        f"subscribers that do not read hold {limits.subscriber_backlog} bytes unsent (the limit)")
    app[SENDERS] = set()
    app[ENCODER] = StatusEncoder()
    app[UNSTARTED] = {}
    app[SPARE] = set()
    app[BOARD] = board
    app[REGISTRY] = registry
    app[READY] = ready
    app[TOKEN] = None if token is None else token.strip()
    app[WS_QUEUE_SIZE] = ws_queue_size
    app[LOOP_LAG] = LoopLagMonitor(loop_lag_interval)
    app[SUBSCRIPTIONS] = set()
    page = STATUS_PAGE.read_bytes()
    app[PAGE] = page
    app[PAGE_CSP] = _page_csp(page.decode())
    app.router.add_get("/", _page)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    app.router.add_get("/status/ws", _status_ws)
    # Started in this order, cleaned up in reverse; a context that never started is not
    # cleaned up (aiohttp's cleanup_ctx contract).
    app.cleanup_ctx.append(_loop_lag_ctx)
    app.cleanup_ctx.append(_render_executor_ctx)
    # WebSockets must end *before* the runner waits for handlers, so on_shutdown, not cleanup.
    app.on_shutdown.append(_close_subscriptions)
    return app


async def _loop_lag_ctx(app: web.Application) -> AsyncIterator[None]:
    monitor = app[LOOP_LAG]
    monitor.start()
    yield
    await monitor.stop()


async def _render_executor_ctx(app: web.Application) -> AsyncIterator[None]:
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgdaemon-metrics")
    app[RENDER_EXECUTOR] = executor
    yield
    # A scrape in flight finishes on its own; nothing waits for it on the loop.
    executor.shutdown(wait=False, cancel_futures=True)


async def _close_subscriptions(app: web.Application) -> None:
    subscriptions: set[Subscription] = app[SUBSCRIPTIONS]
    for sub in tuple(subscriptions):
        sub.close()


# -- handlers -----------------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request,
                 handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> web.StreamResponse:
    """Runs before every route: the Host check, and the mark that stops the head timer."""
    request.app[UNSTARTED].pop(id(request.protocol), None)
    host = request.headers.get("Host")
    # No Host header: not a browser (HTTP/1.0 tools), so not a rebinding vector.
    if host is not None and _host_name(host) not in request.app[ALLOWED_HOSTS]:
        return _json({"error": "unknown Host: add it to daemon.http_allowed_hosts"}, 421)
    if id(request.protocol) not in request.app[SPARE]:
        return await handler(request)
    # Out of file descriptors, on a spare one: answer this request and give it back.
    if "Upgrade" in request.headers:
        response: web.StreamResponse = _json(
            {"error": "the daemon is out of file descriptors; try again later"}, 503)
    else:
        response = await handler(request)
    response.force_close()
    return response


def _host_name(host: str) -> str:
    """``Host`` header or config entry -> lower-case name, no port, IPv6 without brackets."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    if app[OUTBOX].full():
        return app[OUTBOX].busy()
    gzipped = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
    renders = app[RENDERS]
    render = renders.get(gzipped)
    if render is None:
        loop = asyncio.get_running_loop()
        render = loop.run_in_executor(app[RENDER_EXECUTOR], _render, app[REGISTRY], gzipped)
        renders[gzipped] = render
        render.add_done_callback(lambda done: _rendered(renders, gzipped, done))
    # Shielded: a scraper that leaves does not cancel the render the others wait for.
    body = await asyncio.shield(render)
    headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Vary": "Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


def _rendered(renders: dict[bool, asyncio.Future[bytes]], gzipped: bool,
              done: asyncio.Future[bytes]) -> None:
    """A render ended: the next scrape starts a new one."""
    if renders.get(gzipped) is done:
        del renders[gzipped]
    if not done.cancelled():
        done.exception()  # retrieved here too: every scraper may have left meanwhile


def _render(registry: CollectorRegistry, gzipped: bool) -> bytes:
    """Runs in the render thread. Level 1: 16 MB of text gzips ~25x in ~0.1 s (level 6: 0.4 s)."""
    body = render(registry)
    return gzip.compress(body, compresslevel=1, mtime=0) if gzipped else body


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() in ("gzip", "x-gzip"):
            params = params.strip()
            q = params.removeprefix("q=").strip() if params.startswith("q=") else "1"
            try:
                return float(q) > 0
            except ValueError:
                return False
    return False


async def _healthz(request: web.Request) -> web.Response:
    """200 means this handler ran on the loop, i.e. the loop is responsive right now."""
    monitor = request.app[LOOP_LAG]
    body = {
        "status": "ok" if monitor.running else "loop lag monitor stopped",
        "loopLagSeconds": round(monitor.last, 6),
        "loopLagWorstRecentSeconds": round(monitor.worst_recent, 6),
    }
    return _json(body, 200 if monitor.running else 503)


async def _readyz(request: web.Request) -> web.Response:
    try:
        ready = bool(request.app[READY]())
    except Exception as exc:
        log.warning("readiness check raised %s", type(exc).__name__)
        ready = False
    return _json({"ready": ready}, 200 if ready else 503)


async def _status(request: web.Request) -> web.Response:
    if not _authorized(request):
        return _unauthorized()
    app = request.app
    if app[OUTBOX].full():
        return app[OUTBOX].busy()
    board = app[BOARD]
    body = app[ENCODER].document(board.summary(), board.snapshot())
    return web.Response(body=body, content_type="application/json", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def _status_ws(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _unauthorized()
    if not _same_origin(request):
        # Browsers let any page open a WebSocket to 127.0.0.1: only our own page may.
        return _json({"error": "cross-origin WebSocket refused"}, 403)
    app = request.app
    limits = app[LIMITS]
    if len(app[SUBSCRIPTIONS]) >= limits.max_subscribers:
        app[WS_REFUSALS].note()
        return _json({"error": "too many status subscribers; try again later"}, 503)
    # Subscribe before the snapshot: a change in between is then sent twice, never lost.
    sub = app[BOARD].subscribe(app[WS_QUEUE_SIZE])
    app[SUBSCRIPTIONS].add(sub)
    senders = app[SENDERS]
    try:
        snapshot = app[ENCODER].snapshot(app[BOARD].snapshot())
        held = sum(s.held() for s in senders)
        if held and held + len(snapshot) > limits.subscriber_backlog:
            app[BACKLOG_REFUSALS].note()
            return _json({"error": "status subscribers are behind; try again later"}, 503)
        ws = web.WebSocketResponse(protocols=(WS_PROTOCOL,), heartbeat=30.0, max_msg_size=4096)
        # Counted from here: the handshake below lets other subscribers in meanwhile.
        sender = _Sender(ws, request, app[ENCODER], limits.send_timeout, reserved=len(snapshot))
        senders.add(sender)
        try:
            try:
                await ws.prepare(request)
            except ConnectionError:  # gone before the handshake's answer: for the access log
                return web.Response(status=499, reason="Client Closed Request")
            limit_send_buffer(request.transport, limits.send_buffer)
            if await sender.send(snapshot):
                del snapshot  # a newer one may replace it in the encoder: do not pin this one
                await _serve_subscriber(ws, sender, sub)
        finally:
            senders.discard(sender)
    finally:
        sub.close()
        app[SUBSCRIPTIONS].discard(sub)
    return ws


async def _serve_subscriber(ws: web.WebSocketResponse, sender: _Sender,
                            sub: Subscription) -> None:
    pump = asyncio.create_task(_pump(sender, sub), name="status-ws-pump")
    try:
        async for msg in ws:  # the client says nothing; reading handles ping/close
            if msg.type is WSMsgType.ERROR:
                break
    finally:
        pump.cancel()
        await asyncio.wait([pump])
        if not pump.cancelled() and (exc := pump.exception()) is not None:
            log.debug("status WebSocket ended: %s", type(exc).__name__)


class _Sender:
    """Sends to one subscriber with a deadline. aiohttp waits for the socket to drain once
    64 KiB are pending, so a subscriber that stops reading blocks here; at the deadline its
    connection is aborted, which frees what was waiting for it.

    :meth:`held` is what this subscriber keeps in the process: the message being sent
    (referenced until aiohttp's drain returns) and the transport's unsent copy of it."""

    def __init__(self, ws: web.WebSocketResponse, request: web.Request,
                 encoder: StatusEncoder, timeout: float, *, reserved: int = 0) -> None:
        self.ws = ws
        self._transport = request.transport
        self.encoder = encoder
        self._timeout = timeout
        self._sending = reserved

    def held(self) -> int:
        transport = self._transport
        buffered = 0 if transport is None else transport.get_write_buffer_size()
        return self._sending + buffered

    async def send(self, data: bytes) -> bool:
        """Send one UTF-8 JSON text message; False when the subscriber was cut off."""
        self._sending = len(data)
        try:
            await asyncio.wait_for(self.ws.send_frame(data, WSMsgType.TEXT), self._timeout)
        except TimeoutError:
            log.info("status WebSocket subscriber stopped reading; disconnected it")
            if self._transport is not None:
                self._transport.abort()
            return False
        except ConnectionError:  # the subscriber went away while we waited for it to read
            return False
        finally:
            self._sending = 0
        return True


async def _pump(sender: _Sender, sub: Subscription) -> None:
    """Forward changes in order; when the subscription ends, say why in the close code."""
    ws = sender.ws
    async for status in sub:
        if not await sender.send(sender.encoder.encode(status)):
            return
    if sub.overflowed:
        log.info("status WebSocket subscriber fell behind; closing it")
        await ws.close(code=CLOSE_OVERFLOW, message=b"too slow: reconnect for a new snapshot")
    else:
        await ws.close(code=CLOSE_SHUTDOWN, message=b"daemon shutting down")


async def _page(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PAGE],
        content_type="text/html",
        charset="utf-8",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": request.app[PAGE_CSP],
            "Referrer-Policy": "no-referrer",
            "X-Content-Type-Options": "nosniff",
        },
    )


# -- authentication -----------------------------------------------------------------------------


def _authorized(request: web.Request) -> bool:
    expected = request.app[TOKEN]
    if expected is None:
        return True
    want = expected.encode()
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), want):
        return True
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(WS_TOKEN_PREFIX):
            encoded = proto[len(WS_TOKEN_PREFIX) :]
            try:
                candidate = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4))
            except (binascii.Error, ValueError):
                continue
            if hmac.compare_digest(candidate, want):
                return True
    return False


def _unauthorized() -> web.Response:
    response = _json({"error": "unauthorized"}, 401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="tgdaemon"'
    return response


def _same_origin(request: web.Request) -> bool:
    origin = request.headers.get("Origin")
    if origin is None:  # not a browser (CLI, tests, scripts)
        return True
    return urlsplit(origin).netloc.lower() == request.host.lower()


def _page_csp(html: str) -> str:
    """A CSP that allows exactly the page's own inline script and style, by hash."""

    def hashes(tag: str) -> str:
        bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
        return " ".join(
            "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
            for b in bodies
        )

    return (
        f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


# -- server -------------------------------------------------------------------------------------


_BIND_ERRORS = {
    errno.EADDRINUSE: "the port is in use (another tgdaemon, or another program): "
                      "stop it or choose another port",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
}

def _answer(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(text)).encode() + b"\r\nConnection: close\r\n\r\n" + text)


_BUSY = _answer(b"503 Service Unavailable", b"too many connections\n")
_NO_FDS = _answer(b"503 Service Unavailable", b"the daemon is out of file descriptors\n")
#: Connections taken per wake-up of a listening socket before other callbacks run (asyncio's).
_ACCEPT_BATCH = 100
#: How long a listening socket rests when not even a spare descriptor is left (asyncio's).
_ACCEPT_RETRY_DELAY = 1.0
_OUT_OF_RESOURCES = FD_EXHAUSTED | {errno.ENOBUFS, errno.ENOMEM}


def _turn_away(conn: socket.socket, answer: bytes) -> None:
    """Answer on a raw accepted socket and close it. The request already received is read
    first: closing with unread data would reset the connection before the client reads."""
    with contextlib.suppress(OSError), conn:
        conn.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            conn.recv(65536)
        conn.send(answer)
        conn.shutdown(socket.SHUT_WR)


class _Tracked(asyncio.Protocol):
    """aiohttp's handler for one accepted socket, seen by the site from ``accept()`` to the
    close: the connection count and the spare descriptors follow the socket itself."""

    def __init__(self, handler: web.RequestHandler, conn: socket.socket,
                 closed: Callable[[_Tracked], None]) -> None:
        self.handler = handler
        self._conn = conn
        self._closed = closed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.handler.data_received(data)

    def eof_received(self) -> None:
        self.handler.eof_received()

    def pause_writing(self) -> None:
        self.handler.pause_writing()

    def resume_writing(self) -> None:
        self.handler.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self.handler.connection_lost(exc)
        finally:
            # asyncio closes the socket only after this returns: close it first (asyncio's
            # close then does nothing), so that its descriptor is free when the site looks.
            self._conn.close()
            self._closed(self)


class _GuardedSite(web.TCPSite):
    """A TCP site that accepts itself (instead of asyncio's server) so that it can count every
    socket from ``accept()`` to its close (503 beyond ``max_connections``), give each a
    deadline for its request head, and keep answering when the process is out of file
    descriptors.

    Out of descriptors, asyncio's server logs and stops accepting for a second, again and
    again: ``/metrics`` and ``/healthz`` hang exactly when the operator needs them. Here
    ``accept()`` failing with EMFILE releases one of :class:`FdReserve`'s spares and accepts
    into it: while another spare is left the connection is served (one request, then closed,
    no WebSocket), with the last one it gets a 503 and is closed at once (the backlog drains
    instead of filling up). Whenever a connection closes the spares are taken back at once,
    before anything else can take the freed descriptor. Only with no spare at all does a
    listening socket rest for a second, as asyncio's does (Linux reports it readable for as
    long as connections wait, so accepting nothing would spin).
    """

    def __init__(self, runner: web.AppRunner, host: str, port: int, limits: HttpLimits,
                 unstarted: dict[int, web.RequestHandler], spare: set[int],
                 reserve: FdReserve) -> None:
        super().__init__(runner, host, port)
        self._limits = limits
        self._unstarted = unstarted
        self._spare = spare  # ids of the handlers served from the reserve
        self._reserve = reserve
        self._open: set[_Tracked] = set()
        self._listeners: list[socket.socket] = []
        self._setups: set[asyncio.Task[None]] = set()
        self._resting: list[asyncio.TimerHandle] = []
        self.refusals = Refusals("HTTP connection", f"{limits.max_connections} open (the limit)")

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers with the runner; TCPSite's own bind below
        loop = asyncio.get_running_loop()
        # Binding (addresses, IPv6, SO_REUSEADDR, errors) as asyncio does; accepting is ours.
        self._server = await loop.create_server(asyncio.Protocol, self._host, self._port,
                                                start_serving=False)
        self._reserve.fill()
        for bound in self._server.sockets:
            listener = socket.socket(fileno=os.dup(bound.fileno()))
            listener.setblocking(False)
            # A burst up to the connection cap waits in the kernel, not in SYN retries: with
            # aiohttp's 128 a burst of 150 into a busy loop left some handshakes unfinished
            # (the final ACK dropped on a full queue) until SYN-ACK retransmits, 15 s later.
            listener.listen(max(self._backlog, self._limits.max_connections))
            self._listeners.append(listener)
            loop.add_reader(listener, self._accept, listener)

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for handle in self._resting:
            handle.cancel()
        for listener in self._listeners:
            loop.remove_reader(listener)
            listener.close()
        self._listeners.clear()
        for task in self._setups:
            task.cancel()
        if self._setups:
            await asyncio.wait(self._setups)
        await super().stop()

    def open_connections(self) -> int:
        return len(self._open)

    def _accept(self, listener: socket.socket) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    log.warning("HTTP accept failed: %s", exc)
                    return
                # Demoted and summarised (one line per burst) by logvolume, and counted in
                # tgdaemon_fd_exhausted_total.
                log.warning("HTTP accept: %s; answering from the spare descriptors", exc)
                if not self._accept_spare(listener):
                    return
                continue
            if len(self._open) >= self._limits.max_connections:
                self.refusals.note()
                _turn_away(conn, _BUSY)
                continue
            self._serve(conn, spare=False)

    def _accept_spare(self, listener: socket.socket) -> bool:
        """Accept one connection into a spare descriptor; False when the listener rests."""
        if not self._reserve.release():
            self._rest(listener)
            return False
        try:
            conn, _address = listener.accept()
        except OSError:  # gone meanwhile, or a thread took the descriptor
            self._reserve.fill()
            if self._reserve.held == 0:
                self._rest(listener)
            return False
        if self._reserve.held == 0:  # that was the last spare: keep it for the next one
            _turn_away(conn, _NO_FDS)
            self._reserve.fill()
        else:
            self._serve(conn, spare=True)
        return True

    def _rest(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(listener)

        def wake() -> None:
            self._resting.remove(handle)
            self._reserve.fill()
            if listener in self._listeners:
                loop.add_reader(listener, self._accept, listener)

        handle = loop.call_later(_ACCEPT_RETRY_DELAY, wake)
        self._resting.append(handle)

    def _serve(self, conn: socket.socket, *, spare: bool) -> None:
        server = self._runner.server
        assert server is not None
        handler = server()
        tracked = _Tracked(handler, conn, self._closed)
        self._open.add(tracked)
        if spare:
            self._spare.add(id(handler))
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._connect(conn, tracked), name="http-accept")
        self._setups.add(task)
        task.add_done_callback(self._setups.discard)
        self._unstarted[id(handler)] = handler
        # The timer holds the handler, so its id is not reused before the timer fires.
        loop.call_later(self._limits.request_timeout, self._expire, handler)

    async def _connect(self, conn: socket.socket, tracked: _Tracked) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: tracked, conn)
        except BaseException as exc:
            conn.close()
            self._closed(tracked)
            if not isinstance(exc, Exception):
                raise
            log.debug("HTTP connection not set up: %s", type(exc).__name__)

    def _closed(self, tracked: _Tracked) -> None:
        self._open.discard(tracked)
        self._spare.discard(id(tracked.handler))
        # Nothing ran since the socket's close: its descriptor is still free to take back.
        self._reserve.fill()

    def _expire(self, handler: web.RequestHandler) -> None:
        transport = handler.transport
        if self._unstarted.pop(id(handler), None) is handler and transport is not None:
            handler.force_close()
            transport.close()


class HttpServer:
    """Runs an app on one TCP address; binds what it is given (the config defaults to loopback).

    ``port`` is the bound port (useful with port 0). An address that cannot be bound is a
    :class:`ConfigError` with one line saying why. ``spare_fds``: the reserve for when the
    process runs out of descriptors, best filled early (the daemon does); by default the
    server fills its own at start and closes it at stop.
    """

    def __init__(self, app: web.Application, host: str, port: int,
                 spare_fds: FdReserve | None = None) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self._spare_fds = spare_fds
        self._own_spare_fds: FdReserve | None = None
        self.port = port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HttpServer already started")
        limits = self._app[LIMITS]
        runner = web.AppRunner(
            self._app,
            access_log=logging.getLogger("tgdaemon.http.access"),
            access_log_class=type("AccessLogger", (AccessLogger,), {
                "budget": LineBudget(ACCESS_LOG_RATE, time.monotonic)}),
            shutdown_timeout=5.0,
            keepalive_timeout=limits.keepalive_timeout,
            max_headers=limits.max_headers,
        )
        await runner.setup()
        reserve = self._spare_fds
        if reserve is None:
            reserve = self._own_spare_fds = FdReserve(limits.spare_fds)
        reserve.fill()
        try:
            site = _GuardedSite(runner, self._host, self._requested_port, limits,
                                self._app[UNSTARTED], self._app[SPARE], reserve)
            await site.start()
        except OSError as exc:
            await runner.cleanup()  # setup started the app: undo exactly that
            self._close_own_spares()
            host = f"[{self._host}]" if ":" in self._host else self._host
            why = _BIND_ERRORS.get(exc.errno or 0, exc.strerror or type(exc).__name__)
            raise ConfigError(f"daemon.http_listen: cannot listen on {host}:"
                              f"{self._requested_port}: {why}") from None
        except BaseException:
            await runner.cleanup()
            self._close_own_spares()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        self._close_own_spares()

    def _close_own_spares(self) -> None:
        if self._own_spare_fds is not None:
            self._own_spare_fds.close()
            self._own_spare_fds = None
