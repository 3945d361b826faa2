"""Large HTTP answers: each leaves within a deadline, and together they hold a bounded amount.

A client that asks for ``/metrics`` or ``/status`` and then never reads would otherwise keep
the answer in the process for as long as its connection lives: aiohttp hands the whole body
to the transport, which copies what the kernel does not take and waits, without a deadline,
for the client to take it. At 10,000 accounts ``/metrics`` is ~2.4 MB and ``/status`` several
MB; 256 such clients (the connection cap) held about 1 GB. So an answer of at least
:data:`LARGE_ANSWER` bytes (:class:`Outbox`):

* is refused at once with ``503`` and ``Retry-After`` when the large answers still being sent
  already hold ``backlog`` bytes (one always goes out when nothing is held);
* leaves in :data:`SLICE` -byte slices of the one body (no copy of it per client: its
  transport holds at most about two slices unsent) through a socket whose kernel send
  buffer is capped (Linux would let it grow to 4 MiB);
* must be taken by the client within ``timeout`` seconds, else its connection is aborted,
  which frees what it held.

Bodies shared by several answers (one ``/metrics`` render for concurrent scrapes, one
``/status`` document while nothing changed) count once. :class:`Refusals` keeps the log to a
line per thousand of the same refusal, whoever hammers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web, web_protocol

log = logging.getLogger("tgdaemon.http")

#: Answers from this size on go through :meth:`Outbox.deliver`; smaller ones fit in the
#: transport's high-water mark and the kernel buffer, and are bounded by the connection cap.
LARGE_ANSWER = 64 * 1024
#: Bytes handed to the transport at a time.
SLICE = 32 * 1024
#: Requests aiohttp parses ahead of the one being answered on a connection. Each holds its head
#: (up to 32 lines of 8 KiB) until its turn, which may wait for the answer before it to leave
#: (up to the send deadline): with aiohttp's 32, a client pipelining big heads behind a
#: ``/status`` it does not read held ~8 MB per connection (20 connections: +160 MB). aiohttp
#: has no setting for it but this constant, read by each connection's handler and parser as
#: they are made (every server in the process; a test fails if aiohttp stops reading it).
#: Pipelining still works, one request ahead.
PIPELINED = 1
web_protocol.MAX_MSG_QUEUE_SIZE = PIPELINED

#: The kernel send buffer of a socket that a client may stop reading (Linux doubles it).
SEND_BUFFER = 64 * 1024


class Refusals:
    """Counts what a limit turned away; logs the first and every 1,000th, so a client hammering
    a full server cannot flood the journal."""

    def __init__(self, what: str, why: str, *, verb: str = "refused",
                 level: int = logging.WARNING, logger: logging.Logger = log) -> None:
        self.what = what
        self.why = why
        self.verb = verb
        self.level = level
        self.logger = logger
        self.count = 0

    def note(self) -> None:
        self.count += 1
        if self.count == 1 or self.count % 1000 == 0:
            self.logger.log(self.level, "%s %s: %s; %d %s so far", self.what, self.verb, self.why,
                    self.count, self.verb)


def limit_send_buffer(transport: asyncio.BaseTransport | None, size: int) -> None:
    """Fix the kernel send buffer of ``transport``'s socket at ``size`` (Linux doubles it)."""
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)


class _Send:
    """One large answer on its way out: its body (shared or not) and its connection."""

    __slots__ = ("body", "transport")

    def __init__(self, body: bytes, transport: asyncio.BaseTransport | None) -> None:
        self.body = body
        self.transport = transport

    def buffered(self) -> int:
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            return transport.get_write_buffer_size()
        return 0


class Outbox:
    """The large answers being sent, daemon-wide (see the module docstring). ``backlog``:
    bytes they may hold together; ``timeout``: seconds an answer may take to leave;
    ``socket_buffer``: the kernel send buffer of their sockets."""

    def __init__(self, *, backlog: int, timeout: float, socket_buffer: int) -> None:
        self.backlog = backlog
        self.timeout = timeout
        self.socket_buffer = socket_buffer
        self._sending: set[_Send] = set()
        self.refusals = Refusals("large HTTP answer",
                                 f"clients that do not read hold {backlog} bytes (the limit)")
        self.cut_off = Refusals("HTTP client", f"did not take a large answer within {timeout:g} s",
                                verb="disconnected", level=logging.INFO)

    @property
    def sending(self) -> int:
        """Large answers on their way out now."""
        return len(self._sending)

    def held(self) -> int:
        """Bytes the large answers being sent hold: each distinct body once, plus what each
        transport holds unsent."""
        bodies = {id(s.body): len(s.body) for s in self._sending}
        return sum(bodies.values()) + sum(s.buffered() for s in self._sending)

    def full(self) -> bool:
        """Nothing large can go out now (cheap check before building one)."""
        return bool(self._sending) and self.held() >= self.backlog

    def admits(self, body: bytes) -> bool:
        held = self.held()
        if not held:
            return True
        extra = 0 if any(s.body is body for s in self._sending) else len(body)
        return held + extra <= self.backlog

    def busy(self) -> web.Response:
        """The 503 for an answer that does not fit."""
        self.refusals.note()
        return web.json_response(
            {"error": "busy: clients that do not read hold the answers' memory; retry later"},
            status=503, headers={"Cache-Control": "no-store",
                                 "Retry-After": str(max(1, math.ceil(self.timeout)))})

    async def deliver(self, request: web.BaseRequest, response: web.StreamResponse
                      ) -> web.StreamResponse:
        """Send ``response`` if it is large (within the deadline and the backlog); anything
        else goes back to aiohttp untouched."""
        body = response.body if isinstance(response, web.Response) else None
        if (not isinstance(body, bytes) or len(body) < LARGE_ANSWER or response.prepared
                or request.method == "HEAD"):
            return response
        if not self.admits(body):
            return self.busy()
        stream = web.StreamResponse(status=response.status, reason=response.reason,
                                    headers=response.headers)
        stream.content_length = len(body)
        if response.keep_alive is False:  # None: aiohttp decides, as for any answer
            stream.force_close()
        del response  # the body stays referenced by ``body`` alone
        send = _Send(body, request.transport)
        self._sending.add(send)
        try:
            limit_send_buffer(request.transport, self.socket_buffer)
            if isinstance(request.transport, asyncio.WriteTransport):
                # aiohttp waits for the transport to drain below this (64 KiB by default).
                request.transport.set_write_buffer_limits(high=SLICE)
            async with asyncio.timeout(self.timeout):
                await stream.prepare(request)
                view = memoryview(body)
                for start in range(0, len(body), SLICE):
                    await stream.write(view[start:start + SLICE])
                await stream.write_eof()
        except TimeoutError:
            self.cut_off.note()
            if request.transport is not None:
                request.transport.abort()
        except ConnectionError:  # the client went away meanwhile
            pass
        finally:
            self._sending.discard(send)
        return stream


#: The :class:`Outbox` of an app that uses :func:`bounded_answers`.
OUTBOX = web.AppKey("outbox", Outbox)


@web.middleware
async def bounded_answers(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """Every answer of the app goes through its :data:`OUTBOX`."""
    return await request.app[OUTBOX].deliver(request, await handler(request))
