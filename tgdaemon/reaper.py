"""Clients the workers let go of, finished and freed: one reaper for the whole daemon.

A worker gives up a client whose close did not finish within its bound
(:data:`~tgdaemon.accountclient.CLOSE_TIMEOUT`: under overload a lagging loop is enough), whose
connect hung, or that it no longer needs (the account parked or stopped). What a cut-short
close had not reached stays behind: the update loop (Telethon cancels it only once the
sender's disconnect has returned), handler tasks, a transport. A pending task holds its client
through its coroutine, and even a cleanly closed client is cyclic garbage (its sender's
callbacks into it and the sender's own handler table, the tracebacks its ended tasks keep):
the collector never frees one that :mod:`tgdaemon.gcpolicy` froze during the very outage
that made the worker drop it, one client per account and outage.

So every dropped client comes here. Taking it aborts its connections at once (nothing will
read what they had not sent; in a fleet, the lease may be released as soon as the worker has
ended) and cancels what it runs. The reaper, a task that exists only while there is work,
then awaits those tasks for all the clients taken meanwhile in one wait bounded by
:data:`REAP_TIMEOUT`, and cuts the cycles named above, so that reference counting frees them,
frozen or not. The session is not touched: it belongs to the account's next client. A task
that ignores even this cancellation is reported, one line per batch, and let go.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from tgdaemon.connection import abort_connection
from tgdaemon.cycles import drop_frames

log = logging.getLogger("tgdaemon.reaper")

#: How long the tasks of one batch are given to end once cancelled.
REAP_TIMEOUT = 10.0


class Reaper:
    """Finishes and frees the clients workers let go of (see module docstring)."""

    def __init__(self, *, timeout: float = REAP_TIMEOUT) -> None:
        self._timeout = timeout
        self._queue: list[tuple[Any, list[asyncio.Task[Any]]]] = []
        self._task: asyncio.Task[None] | None = None
        #: Clients taken, and torn down, so far; of them, those still connected when taken
        #: (their connections aborted); tasks of theirs that ignored their cancellation.
        self.taken = 0
        self.reaped = 0
        self.aborted = 0
        self.stubborn = 0

    @property
    def pending(self) -> int:
        """Clients taken and not torn down yet."""
        return self.taken - self.reaped

    def take(self, client: Any) -> None:
        """Take over ``client`` (its worker has let go of it): its connections aborted now,
        the rest torn down in the background."""
        self.aborted += client._sender._connection is not None
        self._queue.append((client, _stop(client)))
        self.taken += 1
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reaper")

    async def stop(self) -> None:
        """Tear down what is still queued (bounded as ever): no task of it is left."""
        while self._task is not None:
            await asyncio.shield(self._task)

    async def _run(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._reap(batch)
        finally:
            self._task = None

    async def _reap(self, batch: list[tuple[Any, list[asyncio.Task[Any]]]]) -> None:
        tasks = [task for _client, live in batch for task in live if not task.done()]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self._timeout)
            if pending:
                self.stubborn += len(pending)
                log.warning("%d tasks of dropped clients ignored their cancellation for "
                            "%.0fs; letting them go", len(pending), self._timeout)
        for client, _live in batch:
            _cut(client)
        self.reaped += len(batch)


def _senders(client: Any) -> list[Any]:
    return [client._sender, *(sender for _state, sender in client._borrowed_senders.values())]


def _stop(client: Any) -> list[asyncio.Task[Any]]:
    """Cancel what ``client`` runs and abort its connections; returns its unfinished tasks."""
    tasks: list[Any] = [client._updates_handle, client._keepalive_handle,
                        *client._event_handler_tasks]
    for sender in _senders(client):
        sender._user_connected = False
        tasks += (sender._send_loop_handle, sender._recv_loop_handle,
                  getattr(sender, "_reconnect_task", None))
        for state in sender._pending_state.values():
            state.future.cancel()
        sender._pending_state.clear()
        if sender._connection is not None:
            abort_connection(sender._connection)
            sender._connection = None
    live = [t for t in tasks if t is not None and not t.done()]
    for task in live:
        task.cancel()
    return live


def _cut(client: Any) -> None:
    """Cut a torn-down client's reference cycles (Telethon 1.45's): its sender's callbacks
    into it, the sender's table of its own bound methods, and the frames (each holding the
    client) of the tracebacks its ended tasks and its "disconnected" future keep."""
    for sender in _senders(client):
        sender._auth_key_callback = sender._auto_reconnect_callback = None
        sender._handlers.clear()
        sender._send_loop_handle = sender._recv_loop_handle = sender._reconnect_task = None
        ended = getattr(sender, "_MTProtoSender__disconnected", None)
        if ended is not None and ended.done() and not ended.cancelled():
            drop_frames(ended.exception())
    drop_frames(getattr(client, "_updates_error", None))
    client._updates_handle = client._keepalive_handle = None
    client._event_handler_tasks.clear()

