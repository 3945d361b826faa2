"""The HTTP side: ``/metrics``, ``/healthz``, ``/readyz``, ``/status``, ``/status/ws`` and ``/``.

Loopback by default (the daemon binds what the config says). Authentication is an optional
bearer token for the status endpoints (they name accounts and users): ``Authorization:
Bearer <token>``, or, for browsers that cannot set headers on a WebSocket, the subprotocol
``bearer.<base64url(token)>`` next to :data:`WS_PROTOCOL`. Query-string tokens are not
accepted: they end up in access logs. Tokens are compared with ``hmac.compare_digest`` and
never logged.

``/metrics`` is rendered in a dedicated worker thread (one scrape at a time) so a
10,000-account scrape does not stall heartbeats, and gzip-compressed when the scraper asks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import hashlib
import hmac
import json
import logging
import re
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import CollectorRegistry

from tgdaemon.exceptions import ConfigError
from tgdaemon.metrics import render
from tgdaemon.status import StatusBoard, Subscription

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


# -- typed application state -----------------------------------------------------------------

BOARD = web.AppKey("board", StatusBoard)
REGISTRY = web.AppKey("registry", CollectorRegistry)
READY = web.AppKey("ready", Callable[[], bool])
TOKEN = web.AppKey("token", str | None)
WS_QUEUE_SIZE = web.AppKey("ws_queue_size", int)
LOOP_LAG = web.AppKey("loop_lag", LoopLagMonitor)
RENDER_EXECUTOR = web.AppKey("render_executor", ThreadPoolExecutor)
SUBSCRIPTIONS = web.AppKey("subscriptions", set[Subscription])
PAGE = web.AppKey("page", bytes)
PAGE_CSP = web.AppKey("page_csp", str)


def build_app(
    *,
    board: StatusBoard,
    registry: CollectorRegistry,
    ready: Callable[[], bool],
    token: str | None = None,
    ws_queue_size: int = 1024,
    loop_lag_interval: float = 1.0,
) -> web.Application:
    """The aiohttp application; nothing runs until a runner starts it."""
    if token is not None and not token.strip():
        raise ConfigError("the HTTP token is empty: remove it or set a real one")
    app = web.Application()
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
    for sub in tuple(app[SUBSCRIPTIONS]):
        sub.close()


# -- handlers -----------------------------------------------------------------------------------


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    gzipped = _accepts_gzip(request.headers.get("Accept-Encoding", ""))
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(app[RENDER_EXECUTOR], _render, app[REGISTRY], gzipped)
    headers = {"Content-Type": CONTENT_TYPE_PLAIN_0_0_4, "Vary": "Accept-Encoding"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    return web.Response(body=body, headers=headers)


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
    board = request.app[BOARD]
    return _json(
        {"summary": board.summary(), "accounts": [s.to_json() for s in board.snapshot()]}
    )


async def _status_ws(request: web.Request) -> web.StreamResponse:
    if not _authorized(request):
        return _unauthorized()
    if not _same_origin(request):
        # Browsers let any page open a WebSocket to 127.0.0.1: only our own page may.
        return _json({"error": "cross-origin WebSocket refused"}, 403)
    app = request.app
    ws = web.WebSocketResponse(protocols=(WS_PROTOCOL,), heartbeat=30.0, max_msg_size=4096)
    # Subscribe before the snapshot: a change in between is then sent twice, never lost.
    sub = app[BOARD].subscribe(app[WS_QUEUE_SIZE])
    app[SUBSCRIPTIONS].add(sub)
    try:
        await ws.prepare(request)
        snapshot = [s.to_json() for s in app[BOARD].snapshot()]
        await ws.send_str(json.dumps({"type": "snapshot", "accounts": snapshot}))
        pump = asyncio.create_task(_pump(ws, sub), name="status-ws-pump")
        try:
            async for msg in ws:  # the client says nothing; reading handles ping/close
                if msg.type is WSMsgType.ERROR:
                    break
        finally:
            pump.cancel()
            await asyncio.wait([pump])
            if not pump.cancelled() and (exc := pump.exception()) is not None:
                log.debug("status WebSocket ended: %s", type(exc).__name__)
    finally:
        sub.close()
        app[SUBSCRIPTIONS].discard(sub)
    return ws


async def _pump(ws: web.WebSocketResponse, sub: Subscription) -> None:
    """Forward changes in order; when the subscription ends, say why in the close code."""
    async for status in sub:
        await ws.send_str(json.dumps(status.to_json()))
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


class HttpServer:
    """Runs an app on one TCP address; binds what it is given (the config defaults to loopback).

    ``port`` is the bound port (useful with port 0).
    """

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self._app = app
        self._host = host
        self._requested_port = port
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        if self._runner is not None:
            raise RuntimeError("HttpServer already started")
        runner = web.AppRunner(
            self._app,
            access_log=logging.getLogger("tgdaemon.http.access"),
            shutdown_timeout=5.0,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()  # setup started the app: undo exactly that
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
