"""Listening sites that bound what connecting clients can make the process hold.

Used by every server of the daemon: the HTTP listener (:mod:`tgdaemon.http`, ``/metrics``,
``/status`` and the account API) and the account API's Unix socket
(:mod:`tgdaemon.api.service`). A :class:`GuardedSite` accepts connections itself (instead of
asyncio's server) so that it counts every socket from ``accept()`` to its close (a 503 beyond
``max_connections``), gives each a deadline for its first request head, and keeps answering when
the process is out of file descriptors. :func:`connection_guard` is the middleware that stops
a connection's head timer and serves spare-descriptor connections one request each.
:class:`HttpLimits` holds the bounds; :func:`make_runner` applies the per-connection ones
(keep-alive, header lines, lingering) the same way for every site.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from abc import abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from tgdaemon.fdlimit import HTTP_SPARE_FDS, FdReserve
from tgdaemon.httpsend import OUTBOX, SEND_BUFFER, Outbox, Refusals
from tgdaemon.logvolume import FD_EXHAUSTED

log = logging.getLogger("tgdaemon.http")


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """Bounds on what clients can make the server hold. The defaults fit Prometheus, a few
    status pages and scripts with room to spare; they are not config keys (nobody tunes them).

    * ``max_connections``: open connections at once, per site; one more gets a 503 and is
      closed.
    * ``request_timeout``: a connection must deliver a complete request head this soon after
      it opens (slowloris, idle sockets); an account API request body must arrive within as
      long; the rest of a body that was refused is read and dropped for at most as long
      before the close (aiohttp's lingering time).
    * ``keepalive_timeout``: an idle keep-alive connection is closed after this long (and a
      slow next request head with it).
    * ``max_subscribers``: open ``/status/ws`` connections (one more gets a 503); of the
      account API's limits: its open update streams (one more gets a 429).
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
      (see :class:`GuardedSite`). Part of :data:`tgdaemon.fdlimit.FIXED_FDS`.
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


#: Connections (by id) that have not yet sent a complete request head: the head timer closes
#: those still here when it fires; the first request takes its connection out.
UNSTARTED = web.AppKey("unstarted", dict[int, web.RequestHandler])
#: Connections (by handler id) accepted into a spare descriptor while the process is out of
#: them: one request each, no WebSocket, so that the spare comes back soon.
SPARE: web.AppKey[set[int]] = web.AppKey("spare")
LIMITS = web.AppKey("limits", HttpLimits)


def guard_app(app: web.Application, limits: HttpLimits) -> None:
    """Give ``app`` what its guarded site and middlewares use: the limits, the head-timer
    and spare-descriptor bookkeeping, and the outbox for large answers. The app's middlewares
    must start with :func:`~tgdaemon.httpsend.bounded_answers` and :func:`connection_guard`."""
    app[LIMITS] = limits
    app[UNSTARTED] = {}
    app[SPARE] = set()
    app[OUTBOX] = Outbox(backlog=limits.answer_backlog, timeout=limits.send_timeout,
                         socket_buffer=limits.send_buffer)


@web.middleware
async def connection_guard(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Runs before every route: the mark that stops the head timer, and one request (no
    WebSocket) on a connection accepted into a spare descriptor."""
    request.app[UNSTARTED].pop(id(request.protocol), None)
    if id(request.protocol) not in request.app[SPARE]:
        return await handler(request)
    # Out of file descriptors, on a spare one: answer this request and give it back.
    if "Upgrade" in request.headers:
        response: web.StreamResponse = web.json_response(
            {"error": "the daemon is out of file descriptors; try again later"}, status=503,
            headers={"Cache-Control": "no-store"})
    else:
        response = await handler(request)
    response.force_close()
    return response


def offers_protocol(request: web.BaseRequest, protocol: str) -> bool:
    """Whether a WebSocket handshake may go ahead: the client offers ``protocol``, or no
    subprotocol at all. When none offered is the server's, aiohttp logs a WARNING naming each
    of them, and a browser's carries its token (``bearer.<base64>``): a secret in the journal
    and a line per request, so such a handshake is refused before it gets there."""
    offered = request.headers.get("Sec-WebSocket-Protocol")
    return offered is None or protocol in (p.strip() for p in offered.split(","))


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """An AppRunner with the per-connection bounds of ``app``'s limits (see
    :func:`guard_app`): idle keep-alive, header lines, and how long the rest of a body that
    was refused is read and dropped before the close (aiohttp's 10 s: the request deadline)."""
    limits = app[LIMITS]
    return web.AppRunner(app, keepalive_timeout=limits.keepalive_timeout,
                         max_headers=limits.max_headers, lingering_time=limits.request_timeout,
                         **kwargs)


def _answer(status: bytes, text: bytes) -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(text)).encode() + b"\r\nConnection: close\r\n\r\n" + text)


_BUSY = _answer(b"503 Service Unavailable", b"too many connections\n")
_NO_FDS = _answer(b"503 Service Unavailable", b"the daemon is out of file descriptors\n")
#: Connections taken per wake-up of a listening socket before other callbacks run (asyncio's).
_ACCEPT_BATCH = 100
#: How long a listening socket rests when not even a spare descriptor is left (asyncio's).
_ACCEPT_RETRY_DELAY = 1.0
#: Refused Unix-socket connections kept for their request at once (:meth:`GuardedSite._refuse`;
#: from the margin of :data:`tgdaemon.fdlimit.FIXED_FDS`).
_MAX_LINGERING = 16
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


class GuardedSite(web.BaseSite):
    """A site that accepts itself (instead of asyncio's server) so that it can count every
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

    def __init__(self, runner: web.AppRunner, reserve: FdReserve, *, what: str) -> None:
        super().__init__(runner)
        app = runner.app
        self._limits = app[LIMITS]
        self._unstarted = app[UNSTARTED]
        self._spare = app[SPARE]  # ids of the handlers served from the reserve
        self._reserve = reserve
        self._open: set[_Tracked] = set()
        self._listeners: list[socket.socket] = []
        self._setups: set[asyncio.Task[None]] = set()
        #: Refused Unix-socket connections waiting for their request (see :meth:`_refuse`).
        self._lingering: dict[socket.socket, asyncio.TimerHandle] = {}
        self._resting: list[asyncio.TimerHandle] = []
        self.refusals = Refusals(what, f"{self._limits.max_connections} open (the limit)")
        self._what = what

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers with the runner; TCPSite's own bind below
        # Binding (addresses, IPv6, SO_REUSEADDR, errors) as asyncio does; accepting is ours.
        self._server = server = await self._bind()
        loop = asyncio.get_running_loop()
        self._reserve.fill()
        for bound in server.sockets:
            listener = socket.socket(fileno=os.dup(bound.fileno()))
            listener.setblocking(False)
            # A burst up to the connection cap waits in the kernel, not in SYN retries: with
            # aiohttp's 128 a burst of 150 into a busy loop left some handshakes unfinished
            # (the final ACK dropped on a full queue) until SYN-ACK retransmits, 15 s later.
            listener.listen(max(self._backlog, self._limits.max_connections))
            self._listeners.append(listener)
            loop.add_reader(listener, self._accept, listener)

    @abstractmethod
    async def _bind(self) -> asyncio.Server:
        """The bound, not yet serving, asyncio server whose sockets this site accepts on."""

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        for handle in self._resting:
            handle.cancel()
        for listener in self._listeners:
            loop.remove_reader(listener)
            listener.close()
        self._listeners.clear()
        for conn in tuple(self._lingering):
            self._unlinger(conn)
        for task in self._setups:
            task.cancel()
        if self._setups:
            await asyncio.wait(self._setups)
        await web.BaseSite.stop(self)

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
                    log.warning("%s accept failed: %s", self._what, exc)
                    return
                # Demoted and summarised (one line per burst) by logvolume, and counted in
                # tgdaemon_fd_exhausted_total.
                log.warning("%s accept: %s; answering from the spare descriptors", self._what,
                            exc)
                if not self._accept_spare(listener):
                    return
                continue
            if len(self._open) >= self._limits.max_connections:
                self._refuse(conn)
                continue
            self._serve(conn, spare=False)

    def _refuse(self, conn: socket.socket) -> None:
        """The 503 for a connection beyond the cap. On a Unix socket a client's write to a
        peer that closed fails (EPIPE) before it can read the answer, so the socket is kept
        until its request arrives (at most ``request_timeout``), :data:`_MAX_LINGERING` at most
        of them (beyond, such a client sees its write fail); over TCP the kernel takes the
        request after the close."""
        self.refusals.note()
        if conn.family != socket.AF_UNIX or len(self._lingering) >= _MAX_LINGERING:
            _turn_away(conn, _BUSY)
            return
        try:
            conn.setblocking(False)
            conn.send(_BUSY)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        loop = asyncio.get_running_loop()
        self._lingering[conn] = loop.call_later(self._limits.request_timeout, self._unlinger,
                                                conn)
        loop.add_reader(conn, self._unlinger, conn)

    def _unlinger(self, conn: socket.socket) -> None:
        handle = self._lingering.pop(conn, None)
        if handle is None:
            return
        handle.cancel()
        asyncio.get_running_loop().remove_reader(conn)
        with contextlib.suppress(OSError), conn:
            for _ in range(4):  # what arrived (closing on unread data would reset it)
                if not conn.recv(65536):
                    break

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
            log.debug("%s not set up: %s", self._what, type(exc).__name__)

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


class GuardedTcpSite(GuardedSite):
    """A guarded site on a TCP address."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, reserve: FdReserve) -> None:
        super().__init__(runner, reserve, what="HTTP connection")
        self._host = host
        self._port = port

    @property
    def name(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    async def _bind(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(
            asyncio.Protocol, self._host, self._port, start_serving=False)


class GuardedUnixSite(GuardedSite):
    """A guarded site on a Unix socket (the path must be free: the caller decides what to do
    with a stale one)."""

    def __init__(self, runner: web.AppRunner, path: Path, reserve: FdReserve, *,
                 what: str) -> None:
        super().__init__(runner, reserve, what=what)
        self._path = path

    @property
    def name(self) -> str:
        return f"http://unix:{self._path}:"

    async def _bind(self) -> asyncio.Server:
        return await asyncio.get_running_loop().create_unix_server(
            asyncio.Protocol, str(self._path), start_serving=False)
