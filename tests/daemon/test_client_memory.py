"""What one account's Telethon objects cost (issue 17: memory per account <= plain Telethon).

Measured side by side with stock Telethon in the same process, so the bound is a ratio, not a
byte count of this machine: the daemon's client and connection objects (tgdaemon.telegram,
tgdaemon.connection) replace what Telethon builds per client and never needs (a logger class
per client, ~760-byte deques in every empty queue) and must come out clearly smaller."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import tracemalloc
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from telethon import TelegramClient
from telethon.network import ConnectionTcpFull
from telethon.sessions import MemorySession

from tgdaemon.connection import CappedTcpFull
from tgdaemon.leanqueue import LeanQueue
from tgdaemon.telegram import TELETHON_LOGGER, client_class, shared_loggers

N = 50
API_HASH = "0123456789abcdef" * 2


def _bytes_each(build: Callable[[], Any]) -> float:
    """Traced bytes that stay allocated per object built (kept alive while measured)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        kept = [build() for _ in range(N)]
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == N
    return (after - before) / N


async def test_a_daemon_client_and_connection_cost_less_than_stock_telethons():
    cls = client_class(keepalive_ping=False)
    ours = _bytes_each(lambda: cls(MemorySession(), 1, API_HASH, base_logger=TELETHON_LOGGER)) \
        + _bytes_each(lambda: CappedTcpFull("127.0.0.1", 1, 1, loggers=shared_loggers(None)))
    stock = _bytes_each(lambda: TelegramClient(MemorySession(), 1, API_HASH)) \
        + _bytes_each(lambda: ConnectionTcpFull("127.0.0.1", 1, 1,
                                                loggers=shared_loggers(None)))
    # Before tgdaemon.leanqueue and the shared loggers: 1.03x. With them: ~0.5x.
    assert ours <= 0.85 * stock, (ours, stock)


async def test_lean_queue_keeps_fifo_order_and_wakes_waiters():
    q: LeanQueue[int] = LeanQueue(1)
    getter = asyncio.ensure_future(q.get())
    await asyncio.sleep(0)
    q.put_nowait(1)
    assert await getter == 1
    q.put_nowait(2)
    putter = asyncio.ensure_future(q.put(3))  # full: waits for room
    await asyncio.sleep(0)
    assert not putter.done()
    assert q.get_nowait() == 2
    await putter
    assert q.get_nowait() == 3
    assert q.empty()
    unbounded: LeanQueue[int] = LeanQueue()
    for i in range(5):
        unbounded.put_nowait(i)
    assert [unbounded.get_nowait() for _ in range(5)] == [0, 1, 2, 3, 4]
    for _ in range(5):
        unbounded.task_done()
    await asyncio.wait_for(unbounded.join(), 1)


async def test_lean_queue_get_is_a_future_and_a_wait_that_timed_out_takes_nothing():
    """Telethon's update loop waits with ``wait_for(queue.get(), deadline)``: a future needs
    no Task of its own, as a coroutine does; a wait that ended takes no later item."""
    q: LeanQueue[int] = LeanQueue()
    waiting = q.get()
    assert isinstance(waiting, asyncio.Future)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, 0.01)
    q.put_nowait(1)
    q.put_nowait(2)
    assert await asyncio.wait_for(q.get(), 1) == 1
    assert q.get_nowait() == 2
    gone, live = q.get(), q.get()
    gone.cancel()
    q.put_nowait(3)
    assert await live == 3
    assert q.empty()


@contextlib.asynccontextmanager
async def _loopback_server() -> AsyncIterator[int]:
    """A loopback server that accepts and holds connections (its port), with the collector
    off meanwhile: what is freed inside is freed by reference counting alone."""
    accepted: list[asyncio.StreamWriter] = []

    async def accept(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    gc.disable()
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        gc.enable()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_dropped_connection_is_freed_without_the_collector():
    """What tgdaemon.gcpolicy freezes must not die in a cycle: a connection that was up when
    frozen would never be freed (one per account and outage). Telethon's packet codec and
    asyncio's transport each made one with it."""
    async with _loopback_server() as port:
        conn = CappedTcpFull("127.0.0.1", port, 1, loggers=shared_loggers(None))
        await conn.connect(timeout=5)
        transport = conn._writer.transport
        await conn.disconnect()
        refs = [weakref.ref(conn), weakref.ref(transport)]
        del conn, transport
        assert [r() for r in refs] == [None, None]  # freed by reference counting alone


class _ResetBeforeFirstWrite(CappedTcpFull):
    """The peer resets the connection between the TCP connect and the first write (as it
    does to every connection in an outage): the connect's drain fails."""

    transport: weakref.ref[Any] | None = None

    def _init_conn(self) -> None:
        self.transport = weakref.ref(self._writer.transport)
        self._writer.transport.abort()
        super()._init_conn()


async def test_a_connect_cut_short_after_the_tcp_connect_is_freed_without_the_collector(
        wait_until):
    """Telethon leaves such a stream open and not marked connected: its disconnect skips it
    and its next attempt overwrites it, the transport a cycle with its read callback.
    Measured: one per 200 accounts and outage, left to the collector (bench/gcleak.py)."""
    async with _loopback_server() as port:
        conn = _ResetBeforeFirstWrite("127.0.0.1", port, 1, loggers=shared_loggers(None))
        with contextlib.suppress(ConnectionError):
            await conn.connect(timeout=5)
        assert conn.transport is not None  # it got that far
        await conn.disconnect()  # what the sender does next
        await wait_until(lambda: conn.transport() is None, 5, "transport freed")
