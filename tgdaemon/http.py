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
import errno
import gzip
import hashlib
import hmac
import json
import logging
import operator
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import CollectorRegistry

from tgdaemon.exceptions import ConfigError
from tgdaemon.fdlimit import FdReserve
from tgdaemon.httpsend import OUTBOX, Refusals, bounded_answers, limit_send_buffer
from tgdaemon.httpsite import (
    LIMITS,
    GuardedTcpSite,
    HttpLimits,
    connection_guard,
    guard_app,
    make_runner,
    offers_protocol,
)
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
DEFAULT_LIMITS = HttpLimits()


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
WS_REFUSALS = web.AppKey("ws_refusals", Refusals)
BACKLOG_REFUSALS = web.AppKey("backlog_refusals", Refusals)
#: Renders of /metrics in progress, plain (False) and gzip (True): scrapes meanwhile join them.
RENDERS: web.AppKey[dict[bool, asyncio.Future[bytes]]] = web.AppKey("renders")
#: The open subscribers' senders: what they hold unsent is summed against the backlog limit.
SENDERS: web.AppKey[set[_Sender]] = web.AppKey("senders")
ENCODER = web.AppKey("encoder", StatusEncoder)


def build_app(
    *,
    board: StatusBoard,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    token: str | None = None,
    ws_queue_size: int = 1024,
    loop_lag_interval: float = 1.0,
    allowed_hosts: Collection[str] = DEFAULT_ALLOWED_HOSTS,
    limits: HttpLimits = DEFAULT_LIMITS,
) -> web.Application:
    """The aiohttp application; nothing runs until a runner starts it."""
    if token is not None and not token.strip():
        raise ConfigError("the HTTP token is empty: remove it or set a real one")
    # The outbox outermost: it sends what the guards and the routes answer.
    app = web.Application(middlewares=[bounded_answers, connection_guard, _allowed_host])
    guard_app(app, limits)
    app[RENDERS] = {}
    app[ALLOWED_HOSTS] = frozenset(_host_name(h) for h in allowed_hosts)
    app[WS_REFUSALS] = Refusals("status WebSocket subscriber",
                                f"{limits.max_subscribers} open (the limit)")
    app[BACKLOG_REFUSALS] = Refusals(
        "status WebSocket subscriber",
        f"subscribers that do not read hold {limits.subscriber_backlog} bytes unsent (the limit)")
    app[SENDERS] = set()
    app[ENCODER] = StatusEncoder()
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
async def _allowed_host(request: web.Request,
                        handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
    """Runs before every route: the Host check (DNS rebinding)."""
    host = request.headers.get("Host")
    # No Host header: not a browser (HTTP/1.0 tools), so not a rebinding vector.
    if host is not None and _host_name(host) not in request.app[ALLOWED_HOSTS]:
        return _json({"error": "unknown Host: add it to daemon.http_allowed_hosts"}, 421)
    return await handler(request)


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
    if not offers_protocol(request, WS_PROTOCOL):
        return _json({"error": f"offer the WebSocket subprotocol {WS_PROTOCOL}"}, 400)
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
        runner = make_runner(
            self._app,
            access_log=logging.getLogger("tgdaemon.http.access"),
            access_log_class=type("AccessLogger", (AccessLogger,), {
                "budget": LineBudget(ACCESS_LOG_RATE, time.monotonic)}),
            shutdown_timeout=5.0,
        )
        await runner.setup()
        reserve = self._spare_fds
        if reserve is None:
            reserve = self._own_spare_fds = FdReserve(limits.spare_fds)
        reserve.fill()
        try:
            site = GuardedTcpSite(runner, self._host, self._requested_port, reserve)
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
