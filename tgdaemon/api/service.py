"""The account API under ``/v1/`` on the daemon's HTTP server (see README "Account API").

:class:`AccountApi` wires the pieces: the clients of ``[api]`` (who may do what), the
:class:`~tgdaemon.api.gateway.Gateway` (every call through the account's worker, bounded),
the :class:`~tgdaemon.api.events.UpdateBuffer` (the resumable update stream) and the metrics.
The daemon creates it before its workers (their clients get the update listener when built),
binds it to the supervisor, and registers its routes on the HTTP app.

Nothing here logs a token, a phone number or message text: request bodies are never logged,
errors carry Telegram's error name or a redacted message, and metrics only use the config's
client and account names and the fixed method and outcome vocabularies.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import StreamReader, WSCloseCode, WSMsgType, web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from telethon import functions
from telethon.tl import types as tl

from tgdaemon.api.admission import stream_place
from tgdaemon.api.events import (
    Accounts,
    CursorError,
    Event,
    Subscriber,
    UpdateBuffer,
    decode_cursor,
    encode_cursor,
    message_json,
    peer_json,
)
from tgdaemon.api.gateway import FLEET_LANE, AccountHandle, ApiError, Gateway, Outcome
from tgdaemon.api.openapi import OPENAPI
from tgdaemon.api.peers import parse_peer, resolve_peer
from tgdaemon.api.sessions import list_sessions, terminate_sessions
from tgdaemon.api.tljson import TlJsonError, build_request, to_json
from tgdaemon.apiconfig import ApiClient, ApiMethod, authenticate
from tgdaemon.exceptions import AccountError, ConfigError
from tgdaemon.fdlimit import FdReserve
from tgdaemon.httpsend import (
    OUTBOX,
    SEND_BUFFER,
    Refusals,
    bounded_answers,
    limit_send_buffer,
)
from tgdaemon.httpsite import (
    LIMITS,
    GuardedUnixSite,
    HttpLimits,
    connection_guard,
    guard_app,
    make_runner,
    offers_protocol,
)

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

    from tgdaemon.config import Config, ConfigHolder
    from tgdaemon.crypto import KeyRing
    from tgdaemon.status import AccountStatus, StatusBoard
    from tgdaemon.telegram import ManagedClient

log = logging.getLogger("tgdaemon.api")

#: WebSocket subprotocol of the update stream, and the prefix carrying a browser's token.
WS_PROTOCOL = "tgdaemon.updates.v1"
WS_TOKEN_PREFIX = "bearer."
MAX_BODY = 64 * 1024
MAX_LIMIT = 100
CLOSE_OVERFLOW = WSCloseCode.TRY_AGAIN_LATER  # 1013: resume with the last cursor
NO_CLIENT = "-"
#: The account API's own bounds (README "Account API"), the HTTP listener's defaults: those of
#: its Unix socket (connections, request heads, keep-alive, large answers), and of its update
#: streams on both listeners: ``max_subscribers`` open at once (one more gets 429),
#: ``send_timeout`` seconds for each event to leave (a consumer that stops reading is
#: disconnected).
API_LIMITS = HttpLimits()


@dataclass(frozen=True)
class Encoded:
    """A JSON answer already encoded (off the event loop: :meth:`AccountApi.encode`)."""

    body: bytes



class AccountApi:
    """See the module docstring; constructed before the workers, started by the daemon."""

    def __init__(self, settings: ConfigHolder, board: StatusBoard, keyring: KeyRing,
                 registry: CollectorRegistry, *, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic,
                 limits: HttpLimits = API_LIMITS) -> None:
        self.settings = settings
        #: What a client may hold: see API_LIMITS.
        self.limits = limits
        self.board = board
        config = settings.current
        self.buffer = UpdateBuffer(config.daemon.state_dir, keyring, config.api.updates_buffer)
        self._handle: Callable[[str], AccountHandle] | None = None
        self.gateway = Gateway(lambda: self.settings.current.api, self._status, self._worker,
                               clock=clock, monotonic=monotonic)
        #: Open update streams: the client's name and subscription of each, oldest first;
        #: and those pushed out for another client (closing).
        self._streams: dict[web.WebSocketResponse, tuple[str, Subscriber]] = {}
        self._evicted: set[web.WebSocketResponse] = set()
        self._unix: web.AppRunner | None = None
        self.requests = RequestCounter(self.gateway)
        #: Internal errors by method and exception type (see :meth:`_failed`).
        self._bugs: dict[tuple[ApiMethod, str], int] = {}
        #: Summarised log lines for what the bounds turn away (one per thousand).
        self.slow_bodies = Refusals("account API request", "its body did not arrive within "
                                    "the request deadline", verb="cut off", level=logging.INFO)
        self.stream_refusals = Refusals("account API update stream",
                                        f"{limits.max_subscribers} open (the limit)")
        self.pushed_out = Refusals("account API update stream", "another client needed one "
                                   "and held fewer", verb="pushed out", level=logging.INFO)
        self.slow_consumers = Refusals(
            "account API update stream", f"the consumer did not take an event within "
            f"{limits.send_timeout:g} s", verb="disconnected", level=logging.INFO)
        #: One thread turns large TL results into JSON (see :meth:`encode`).
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="api-encode")
        registry.register(self.requests)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.buffer.open()
        path = self.config.api.unix_socket
        if path is not None:
            try:
                self._unix = await _serve_unix(self, path, self.limits)
            except BaseException:
                await self.buffer.close()
                raise

    async def stop(self) -> None:
        for ws in tuple(self._streams):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon shutting down")
        if self._unix is not None:
            await self._unix.cleanup()
            self._unix = None
        self._encoder.shutdown(wait=False, cancel_futures=True)
        await self.buffer.close()

    @property
    def client_hooks(self) -> tuple[Callable[[str, ManagedClient], None], ...]:
        return (self.buffer.attach,)

    def bind(self, handle: Callable[[str], AccountHandle]) -> None:
        """The supervisor's ``worker(name)``: how calls reach an account's client."""
        self._handle = handle

    @property
    def config(self) -> Config:
        """The running configuration: a reload's clients and limits apply to the next call
        (``updates_buffer`` at the next start)."""
        return self.settings.current

    def register(self, app: web.Application) -> None:
        app[API] = self
        app.router.add_get("/v1/openapi.json", _openapi)
        app.router.add_get("/v1/accounts", _accounts)
        app.router.add_get("/v1/accounts/{name}", _account)
        app.router.add_post("/v1/accounts/{name}/messages",
                            _through_account(ApiMethod.SEND_MESSAGE, _send))
        app.router.add_get("/v1/accounts/{name}/messages",
                           _through_account(ApiMethod.HISTORY, _history))
        app.router.add_get("/v1/accounts/{name}/dialogs",
                           _through_account(ApiMethod.DIALOGS, _dialogs))
        app.router.add_post("/v1/accounts/{name}/read", _through_account(ApiMethod.READ, _read))
        app.router.add_post("/v1/accounts/{name}/invoke",
                            _through_account(ApiMethod.INVOKE, _invoke))
        app.router.add_get("/v1/accounts/{name}/sessions",
                           _through_account(ApiMethod.SESSIONS, _sessions))
        app.router.add_post("/v1/accounts/{name}/sessions/terminate",
                            _through_account(ApiMethod.TERMINATE_SESSIONS, _terminate))
        app.router.add_get("/v1/updates", _updates)
        app.on_shutdown.append(self._close_sockets)

    async def _close_sockets(self, _app: web.Application) -> None:
        for ws in tuple(self._streams):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"daemon shutting down")

    def make_room(self, client: str) -> None:
        """Let ``client`` open an update stream (:func:`stream_place`): at once, by pushing
        out the biggest holder's newest stream, or not (:class:`ApiError` 429)."""
        held: dict[str, int] = {}
        for ws, (name, _sub) in self._streams.items():
            if ws not in self._evicted:
                held[name] = held.get(name, 0) + 1
        place = stream_place(held, client, self.limits.max_subscribers)
        if not place.opens:
            self.stream_refusals.note()
            raise ApiError(Outcome.BUSY, f"{self.limits.max_subscribers} update streams "
                           "already open", retry_after=5)
        if place.evict is not None:
            ws, (_name, sub) = next(item for item in reversed(self._streams.items())
                                    if item[1][0] == place.evict and item[0] not in self._evicted)
            self._evicted.add(ws)
            sub.close()  # its stream ends after what it was sending, with 1013
            self.pushed_out.note()

    def _status(self, name: str) -> AccountStatus | None:
        return self.board.get(name) if _has_account(self.config, name) else None

    def _worker(self, name: str) -> AccountHandle:
        if self._handle is None:  # the Unix socket answers before the workers exist
            raise AccountError("the daemon is starting")
        return self._handle(name)

    # -- one request -----------------------------------------------------------------------

    def count(self, client: ApiClient | None, account: str | None, method: ApiMethod,
              outcome: Outcome) -> None:
        known = account if account is not None and _has_account(self.config, account) else "-"
        self.requests.inc(client.name if client else NO_CLIENT, known, method, outcome)

    async def serve(self, request: web.Request, method: ApiMethod, account: str | None,
                    work: Callable[[ApiClient], Awaitable[Any]]) -> web.StreamResponse:
        """Authenticate, authorise, run ``work``, count, answer; every refusal is one line of
        JSON with the reason and the right status."""
        client: ApiClient | None = None
        try:
            client = self.authenticate(request)
            self.authorise(request, client, method, account)
            result = await work(client)
        except ApiError as err:
            self.count(client, account, method, err.outcome)
            return _error(err)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(method, exc)
            self.count(client, account, method, Outcome.ERROR)
            return _error(ApiError(Outcome.ERROR, "internal error"))
        if isinstance(result, web.StreamResponse):
            return result  # a WebSocket: counted when it was accepted
        self.count(client, account, method, Outcome.OK)
        if isinstance(result, Encoded):
            return web.Response(body=result.body, content_type="application/json",
                                headers={"Cache-Control": "no-store"})
        return _json(result)

    def _failed(self, method: ApiMethod, exc: Exception) -> None:
        """A bug: its traceback once per method and exception type, then a line per 1,000
        (a client that found it must not decide how much the journal takes)."""
        key = (method, type(exc).__name__)
        n = self._bugs[key] = self._bugs.get(key, 0) + 1
        if n == 1:
            log.error("API %s failed: %s", method.value, key[1], exc_info=exc)
        elif n % 1000 == 0:
            log.error("API %s failed: %s; %d times so far (the traceback is logged the first "
                      "time)", method.value, key[1], n)

    async def encode(self, build: Callable[[], Any]) -> Encoded:
        """``json(build())`` in the encoder thread. A TL result can be large (a history of
        100 long messages through ``invoke``: ~0.7 MB of JSON, 50-100 ms of Python); on the
        loop that would delay every heartbeat by as much, in a thread the loop keeps the
        interpreter at least every switch interval (5 ms). One thread: at most one encoding
        competes with the loop at a time."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._encoder, lambda: Encoded(json.dumps(build()).encode()))

    def authenticate(self, request: web.Request) -> ApiClient:
        token = _token(request)
        client = authenticate(self.config.api.clients, token) if token else None
        if client is None:
            raise ApiError(Outcome.UNAUTHORIZED, "a valid bearer token is required")
        return client

    def authorise(self, request: web.Request, client: ApiClient, method: ApiMethod,
                  account: str | None) -> None:
        if not _same_origin(request):
            raise ApiError(Outcome.FORBIDDEN, "cross-origin requests are refused")
        if not client.may_call(method):
            raise ApiError(Outcome.FORBIDDEN, f"client may not call {method.value}")
        if account is not None and not client.may_use(account):
            raise ApiError(Outcome.FORBIDDEN, "client may not use this account")
        if account is not None and not _has_account(self.config, account):
            raise ApiError(Outcome.NOT_FOUND, "no such account")


class RequestCounter:
    """``tgdaemon_api_requests_total{client,account,method,outcome}``: a plain dict of
    numbers rendered at scrape time (no child object or ``_created`` series per label set).
    Bounded: clients and accounts come from the config ("-" for none/unknown), methods and
    outcomes from fixed vocabularies. With it, the gateway's daemon-wide load: calls running
    and waiting for a turn (one series each; alert on waiting near ``api.max_queued``)."""

    def __init__(self, gateway: Gateway) -> None:
        self._counts: dict[tuple[str, str, str, str], int] = {}
        self._gateway = gateway

    def inc(self, client: str, account: str, method: ApiMethod, outcome: Outcome) -> None:
        key = (client, account, method.value, outcome.value)
        self._counts[key] = self._counts.get(key, 0) + 1

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(
            "tgdaemon_api_requests", "Account API calls by client, account, method and outcome",
            labels=("client", "account", "method", "outcome"))
        for labels, value in list(self._counts.items()):
            family.add_metric(labels, value)
        return [family,
                GaugeMetricFamily("tgdaemon_api_calls_running",
                                  "Account API calls running through the workers now "
                                  "(at most api.max_in_flight)", value=self._gateway.running),
                GaugeMetricFamily("tgdaemon_api_calls_waiting",
                                  "Account API calls waiting for their turn now (at most "
                                  "api.max_queued)", value=self._gateway.waiting)]


API = web.AppKey("account_api", AccountApi)


async def _serve_unix(api: AccountApi, path: Path, limits: HttpLimits) -> web.AppRunner:
    """The /v1 routes alone on a Unix socket, mode 0660. A stale socket left by a crash is
    replaced; one another process still answers on is not (ConfigError)."""
    if await asyncio.to_thread(path.is_socket):
        try:
            _reader, writer = await asyncio.open_unix_connection(str(path))
        except OSError:
            await asyncio.to_thread(path.unlink)
        else:
            writer.close()
            raise ConfigError(f"api.unix_socket {path} is in use by another process")
    # Bounded as the TCP listener is (a connection cap of its own: a local program that
    # exhausts it leaves /metrics and /healthz on the TCP listener alone).
    app = web.Application(client_max_size=MAX_BODY,
                          middlewares=[bounded_answers, connection_guard])
    guard_app(app, limits)
    api.register(app)
    runner = make_runner(app, access_log=None)
    await runner.setup()
    try:
        # No spare descriptors: out of them, the socket pauses accepting for a second.
        site = GuardedUnixSite(runner, path, FdReserve(0), what="API socket connection")
        await site.start()
        await asyncio.to_thread(os.chmod, path, 0o660)
    except BaseException:
        await runner.cleanup()
        raise
    log.info("account API also on Unix socket %s", path)
    return runner


def _has_account(config: Config, name: str) -> bool:
    try:
        config.account(name)
    except Exception:
        return False
    return True


# -- helpers ----------------------------------------------------------------------------------


def _json(data: object, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, headers={"Cache-Control": "no-store"})


def _error(err: ApiError) -> web.Response:
    response = _json(err.to_json(), err.status)
    if err.retry_after is not None:
        response.headers["Retry-After"] = str(err.retry_after)
    if err.outcome is Outcome.UNAUTHORIZED:
        response.headers["WWW-Authenticate"] = 'Bearer realm="tgdaemon"'
    if err.close:
        response.force_close()
    return response


def _token(request: web.Request) -> str:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and given.strip():
        return given.strip()
    for proto in request.headers.get("Sec-WebSocket-Protocol", "").split(","):
        proto = proto.strip()
        if proto.startswith(WS_TOKEN_PREFIX):
            encoded = proto[len(WS_TOKEN_PREFIX):]
            try:
                return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
            except (binascii.Error, ValueError):
                return ""
    return ""


def _same_origin(request: web.Request) -> bool:
    """Programs send no Origin; a browser page may only call us from our own origin."""
    origin = request.headers.get("Origin")
    return origin is None or urlsplit(origin).netloc.lower() == request.host.lower()


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object in the request body: at most MAX_BODY bytes, all of it within the
    listener's ``request_timeout`` (a client that sends the head and then trickles or stops
    would otherwise hold the handler for as long as it likes: nothing else times it)."""
    too_large = ApiError(Outcome.BAD_REQUEST, f"body larger than {MAX_BODY} bytes", close=True)
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise too_large
    deadline = request.app[LIMITS].request_timeout
    try:
        async with asyncio.timeout(deadline):
            raw = await _read_at_most(request.content, MAX_BODY + 1)
    except TimeoutError:
        _api(request).slow_bodies.note()
        raise ApiError(Outcome.BAD_REQUEST, f"the body did not arrive within {deadline:g} s",
                       close=True) from None
    if len(raw) > MAX_BODY:
        raise too_large
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(Outcome.BAD_REQUEST, "body must be JSON") from None
    if not isinstance(data, dict):
        raise ApiError(Outcome.BAD_REQUEST, "body must be a JSON object")
    return data


async def _read_at_most(content: StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes of ``content``, however many pieces they arrive in (one
    ``read(n)`` returns what has arrived so far, not ``n`` bytes)."""
    chunks: list[bytes] = []
    size = 0
    while size < limit and (chunk := await content.read(limit - size)):
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _int(value: Any, name: str, default: int, lo: int, hi: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(Outcome.BAD_REQUEST, f"{name} must be an integer") from None
    if isinstance(value, bool) or not lo <= number <= hi:
        raise ApiError(Outcome.BAD_REQUEST, f"{name} must be between {lo} and {hi}")
    return number


def _peer(value: Any) -> Any:
    if value is None:
        raise ApiError(Outcome.BAD_REQUEST, "peer is required")
    try:
        return parse_peer(value)
    except ValueError as exc:
        raise ApiError(Outcome.BAD_REQUEST, str(exc)) from None


def _api(request: web.Request) -> AccountApi:
    return request.app[API]


# -- handlers -----------------------------------------------------------------------------------

#: What a route that acts through an account does with the account's client.
Call = Callable[["ManagedClient"], Awaitable[Any]]


def _through_account(method: ApiMethod, prepare: Callable[[web.Request], Awaitable[Call]]
                     ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A route acting through ``{name}``: ``prepare`` validates the request (a 400 costs no
    queue slot) and returns the call, which then runs through the gateway."""

    async def handler(request: web.Request) -> web.StreamResponse:
        api = _api(request)
        name = request.match_info["name"]

        async def work(client: ApiClient) -> Any:
            return await api.gateway.call(name, await prepare(request), client=client.name)

        return await api.serve(request, method, name, work)

    return handler



#: The OpenAPI document (23 KB) encoded once: anyone who reaches the port may ask for it.
_OPENAPI_BODY = json.dumps(OPENAPI).encode()


async def _openapi(request: web.Request) -> web.Response:
    return web.Response(body=_OPENAPI_BODY, content_type="application/json", charset="utf-8",
                        headers={"Cache-Control": "no-store"})


async def _accounts(request: web.Request) -> web.StreamResponse:
    api = _api(request)

    async def work(client: ApiClient) -> Any:
        outbox = request.app.get(OUTBOX)
        if outbox is not None and outbox.full():  # ~3 MB at 10,000 that could not go out
            raise ApiError(Outcome.OVERLOADED, "clients that do not read hold the answers' "
                           "memory", retry_after=max(1, math.ceil(outbox.timeout)))
        # 10,000 statuses are ~3 MB of JSON and ~0.3 s of Python: a turn like a call to
        # Telegram, and encoded off the loop.
        async with api.gateway.turn(client.name, FLEET_LANE):
            statuses = api.board.snapshot()
            return await api.encode(lambda: {"accounts": [
                s.to_json() for s in statuses if client.may_use(s.account)]})

    return await api.serve(request, ApiMethod.ACCOUNTS, None, work)


async def _account(request: web.Request) -> web.StreamResponse:
    """One account's status, in a turn on the account's lane like a call to Telegram. The
    read itself is cheap (one object in memory, ~0.5 KB of JSON), but what a client asking
    for it as fast as it can costs the loop is HTTP: without a turn, 40 connections made
    hundreds a second and other accounts' heartbeats came back up to ~170 ms late (p90, a
    loaded 2-core machine; tests/api). With one, a client waits for its turn instead (the
    connection cap, 256, is below the daemon's places, 544), so its rate is ``max_rate``; it
    is refused at once only beyond the places, like any call."""
    api = _api(request)
    name = request.match_info["name"]

    async def work(client: ApiClient) -> Any:
        async with api.gateway.turn(client.name, name):
            status = api.board.get(name)
            if status is None:
                raise ApiError(Outcome.NOT_FOUND, "no such account")
            return status.to_json()

    return await api.serve(request, ApiMethod.ACCOUNTS, name, work)


async def _send(request: web.Request) -> Call:
    body = await _body(request)
    ref = _peer(body.get("peer"))
    text = body.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(Outcome.BAD_REQUEST, "text must be a non-empty string")
    if len(text) > 4096:
        raise ApiError(Outcome.BAD_REQUEST, "text longer than 4096 characters")
    reply_to = _int(body.get("replyTo"), "replyTo", 0, 0, 2**31 - 1) or None

    async def call(tc: ManagedClient) -> Any:
        peer = await resolve_peer(tc, ref)
        msg = await tc.send_message(peer, text, reply_to=reply_to, link_preview=False)
        return {"id": msg.id, "date": int(msg.date.timestamp()) if msg.date else None,
                "peer": peer_json(msg.peer_id)}

    return call


async def _history(request: web.Request) -> Call:
    q = request.query
    ref = _peer(q.get("peer"))
    limit = _int(q.get("limit"), "limit", 20, 1, MAX_LIMIT)
    offset_id = _int(q.get("offset_id"), "offset_id", 0, 0, 2**31 - 1)

    async def call(tc: ManagedClient) -> Any:
        peer = await resolve_peer(tc, ref)
        result = await tc(functions.messages.GetHistoryRequest(
            peer=peer, offset_id=offset_id, offset_date=None, add_offset=0, limit=limit,
            max_id=0, min_id=0, hash=0))
        return {"messages": [message_json(m) for m in result.messages
                             if not isinstance(m, tl.MessageEmpty)]}

    return call


async def _dialogs(request: web.Request) -> Call:
    limit = _int(request.query.get("limit"), "limit", 20, 1, MAX_LIMIT)

    async def call(tc: ManagedClient) -> Any:
        result = await tc(functions.messages.GetDialogsRequest(
            offset_date=None, offset_id=0, offset_peer=tl.InputPeerEmpty(), limit=limit,
            hash=0))
        names = {("user", u.id): " ".join(filter(None, (u.first_name, u.last_name)))
                 for u in result.users if isinstance(u, tl.User)}
        usernames = {u.id: u.username for u in result.users if isinstance(u, tl.User)}
        names.update({("chat" if isinstance(c, tl.Chat) else "channel", c.id): c.title
                      for c in result.chats if hasattr(c, "title")})
        out = []
        for d in result.dialogs:
            if not isinstance(d, tl.Dialog):
                continue
            peer = peer_json(d.peer)
            key = (peer["type"], peer["id"]) if peer else None
            out.append({
                "peer": peer, "name": names.get(key) if key else None,
                "username": usernames.get(peer["id"]) if peer and peer["type"] == "user"
                else None,
                "topMessage": d.top_message, "unreadCount": d.unread_count,
                "readInboxMaxId": d.read_inbox_max_id,
                "readOutboxMaxId": d.read_outbox_max_id})
        return {"dialogs": out}

    return call


async def _read(request: web.Request) -> Call:
    body = await _body(request)
    ref = _peer(body.get("peer"))
    max_id = _int(body.get("maxId"), "maxId", 0, 0, 2**31 - 1)

    async def call(tc: ManagedClient) -> Any:
        peer = await resolve_peer(tc, ref)
        if isinstance(peer, tl.InputPeerChannel):
            await tc(functions.channels.ReadHistoryRequest(
                channel=tl.InputChannel(peer.channel_id, peer.access_hash), max_id=max_id))
        else:
            await tc(functions.messages.ReadHistoryRequest(peer=peer, max_id=max_id))
        return {"ok": True}

    return call


async def _invoke(request: web.Request) -> Call:
    api = _api(request)
    body = await _body(request)
    try:
        tl_request = build_request(body)
    except TlJsonError as exc:
        raise ApiError(Outcome.BAD_REQUEST, str(exc)) from None

    async def call(tc: ManagedClient) -> Any:
        result = await tc(tl_request)
        return await api.encode(lambda: {"result": to_json(result)})

    return call


async def _sessions(request: web.Request) -> Call:
    return list_sessions(with_ip=_api(request).config.security.log_ip)


async def _terminate(request: web.Request) -> Call:
    return terminate_sessions(await _body(request))


async def _updates(request: web.Request) -> web.StreamResponse:
    """The update stream (see README): ``?accounts=a,b`` (default: every account the client
    may use) and ``?cursor=`` (the last one received; omit it to start from now)."""
    api = _api(request)

    async def work(client: ApiClient) -> Any:
        names = [n for n in request.query.get("accounts", "").split(",") if n]
        for n in names:
            if not client.may_use(n):
                raise ApiError(Outcome.FORBIDDEN, "client may not use this account")
            if not _has_account(api.config, n):
                raise ApiError(Outcome.NOT_FOUND, "no such account")
        if names:
            accounts: Accounts = frozenset(names)
        elif client.accounts == ("*",):
            accounts = None
        else:  # matched as events come: no set of the whole fleet per stream
            accounts = _Usable(client, api)
        if not offers_protocol(request, WS_PROTOCOL):
            raise ApiError(Outcome.BAD_REQUEST, f"offer the WebSocket subprotocol {WS_PROTOCOL}")
        cursor = request.query.get("cursor")
        after: int | None = None
        if cursor:
            try:
                after = decode_cursor(api.buffer.epoch, cursor)
            except CursorError as exc:
                raise ApiError(Outcome.BAD_REQUEST, str(exc)) from None
        return await _stream(request, api, client, accounts, after)

    return await api.serve(request, ApiMethod.UPDATES, None, work)


@dataclass(frozen=True)
class _Usable:
    """The configured accounts ``client`` may use, as a container (see :data:`Accounts`)."""

    client: ApiClient
    api: AccountApi

    def __contains__(self, account: object) -> bool:
        return (isinstance(account, str) and self.client.may_use(account)
                and _has_account(self.api.config, account))


async def _stream(request: web.Request, api: AccountApi, client: ApiClient,
                  accounts: Accounts, after: int | None) -> web.StreamResponse:
    buffer = api.buffer
    api.make_room(client.name)
    ws = web.WebSocketResponse(protocols=(WS_PROTOCOL,), heartbeat=30.0, max_msg_size=4096)
    # Subscribe first, then read what is held up to that point: nothing falls in between;
    # live events already sent from the backlog are skipped by sequence number.
    sub = buffer.subscribe(accounts)
    upto = buffer.last_seq
    api._streams[ws] = (client.name, sub)
    timeout = api.limits.send_timeout
    try:
        try:
            await ws.prepare(request)
        except ConnectionError:  # gone before the handshake's answer: nothing to log
            return web.Response(status=499, reason="Client Closed Request")
        except web.HTTPException:  # not a WebSocket handshake: the client's mistake, no bug
            raise ApiError(Outcome.BAD_REQUEST, "not a WebSocket handshake") from None
        # A consumer that stops reading: the kernel keeps 128 KiB for it, not up to 4 MiB.
        limit_send_buffer(request.transport, SEND_BUFFER)
        api.count(client, None, ApiMethod.UPDATES, Outcome.OK)
        try:
            overflowed = await _pump(ws, buffer, sub, after, upto, timeout)
        except TimeoutError:  # the consumer stopped reading
            api.slow_consumers.note()
            overflowed = True
        except ConnectionError:  # the consumer went away
            return ws
        if ws in api._evicted:
            await _close(ws, request, timeout, CLOSE_OVERFLOW,
                         b"another client needs a stream: resume with your cursor")
        elif overflowed:
            await _close(ws, request, timeout, CLOSE_OVERFLOW,
                         b"too slow: resume with your cursor")
        else:
            await _close(ws, request, timeout)
    finally:
        buffer.unsubscribe(sub)
        api._streams.pop(ws, None)
        api._evicted.discard(ws)
    return ws


async def _close(ws: web.WebSocketResponse, request: web.Request, timeout: float,
                 code: int = WSCloseCode.OK, message: bytes = b"") -> None:
    """Close politely within ``timeout``, else drop the connection: the close frame waits
    behind what a consumer that stopped reading did not take."""
    try:
        async with asyncio.timeout(timeout):
            await ws.close(code=code, message=message)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()


async def _pump(ws: web.WebSocketResponse, buffer: UpdateBuffer, sub: Subscriber,
                after: int | None, upto: int, timeout: float) -> bool:
    """The backlog after the cursor, ``ready``, then live events until the consumer leaves
    or the subscription ends; True when it ended because the consumer fell behind."""
    last = upto if after is None else after
    if after is not None:
        async for event in buffer.backlog(sub.accounts, after, upto):
            await _emit(ws, _encode(event.to_json(buffer.epoch)), timeout)
        last = upto
    await _emit(ws, _encode({"type": "ready", "cursor": _cursor(buffer, last)}), timeout)
    reader = asyncio.create_task(_drain(ws), name="api-updates-reader")
    try:
        async for event in _until(sub, reader):
            if event.seq > last:
                await _emit(ws, buffer.encoder.encode(event, buffer.epoch), timeout)
                last = event.seq
    finally:
        reader.cancel()
        await asyncio.wait([reader])
    return sub.overflowed


def _encode(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode()


async def _emit(ws: web.WebSocketResponse, text: bytes, timeout: float) -> None:
    """One event (UTF-8 JSON) out, within ``timeout``: a consumer that stopped reading holds
    no handler (it resumes with its last cursor and misses nothing)."""
    async with asyncio.timeout(timeout):
        await ws.send_frame(text, WSMsgType.TEXT)


def _cursor(buffer: UpdateBuffer, seq: int) -> str:
    return encode_cursor(buffer.epoch, seq)


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) what the consumer sends; ends when it closes."""
    async for msg in ws:
        if msg.type is WSMsgType.ERROR:
            break


async def _until(sub: Subscriber, reader: asyncio.Task[None]) -> AsyncIterator[Event]:
    """The subscription's events until it ends or the consumer goes away."""
    iterator = sub.__aiter__()
    while True:
        nxt = asyncio.ensure_future(iterator.__anext__())
        done, _ = await asyncio.wait({nxt, reader}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()
            await asyncio.wait([nxt])
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


__all__ = ["API", "AccountApi"]
