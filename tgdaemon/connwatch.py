"""A sleep that a dropped connection (or a new policy) cuts short, at heartbeat scale.

``client.disconnected`` builds a new pair of ``asyncio.shield`` futures on every call, and a
timed-out wait on one leaves a callback on Telethon's underlying future forever (one leaked
callback per heartbeat per account). So the future is taken once per connection with one
callback that wakes the sleep; the sleep itself is one future and one timer, like
``asyncio.sleep`` (``asyncio.wait`` cost 13 % of the idle CPU at 10,000 accounts in
allocations and the garbage collection they trigger). The sleep's timer is the fleet's shared
:class:`~tgdaemon.wheel.TimerWheel`: it ends on a tick boundary shared with other accounts.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tgdaemon.wheel import TimerWheel


class ConnectionWatch:
    """Watches one client's current connection for its worker."""

    __slots__ = ("_disconnected", "_sleeper", "_wheel")

    def __init__(self, wheel: TimerWheel | None = None) -> None:
        self._wheel = TimerWheel() if wheel is None else wheel
        self._disconnected: asyncio.Future[None] | None = None
        #: The sleep in progress: its result is True when it ran out, False when woken.
        self._sleeper: asyncio.Future[bool] | None = None

    @property
    def lost(self) -> bool:
        """No connection is watched, or the watched one has ended."""
        return self._disconnected is None or self._disconnected.done()

    def watch(self, client: Any) -> None:
        """Watch ``client``'s current connection (after a connect or a DC switch)."""
        self.forget()
        watched = client.disconnected
        watched.add_done_callback(self._on_disconnected)
        self._disconnected = watched

    def forget(self) -> None:
        fut, self._disconnected = self._disconnected, None
        if fut is None:
            return
        fut.remove_done_callback(self._on_disconnected)
        if not fut.done():
            fut.cancel()  # the shield's cancel detaches it from Telethon's future
        elif not fut.cancelled():
            fut.exception()  # retrieved: no "exception was never retrieved" warning

    def wake(self) -> None:
        """End the sleep in progress early (it returns False)."""
        if self._sleeper is not None:
            settle(self._sleeper, False)

    async def sleep(self, seconds: float, client: Any, tick: float = 0.0) -> bool:
        """Sleep ``seconds``, rounded up to a multiple of ``tick`` (loop time): True when the
        time ran out, False when :meth:`wake` cut it short; when the connection
        dropped first, the error it ended with (:func:`ended_with`)."""
        watched = self._disconnected
        if watched is None:
            await self._wheel.sleep(seconds, tick)
            return True
        ran_out = True
        if not watched.done():
            sleeper = self._wheel.sleeper(seconds, tick)
            self._sleeper = sleeper
            try:
                ran_out = await sleeper
            finally:
                self._sleeper = None
            if not watched.done():
                return ran_out
        if client is not None and client.is_connected():
            # Telethon reconnected under us (a DC switch): watch the new connection.
            self.watch(client)
            return ran_out
        raise ended_with(watched)

    def _on_disconnected(self, _watched: asyncio.Future[None]) -> None:
        if self._sleeper is not None:  # batched: an outage drops every connection at once
            self._wheel.wake(self._sleeper)


def ended_with(watched: asyncio.Future[None]) -> Exception:
    """What the ended connection ``watched`` ended with, to recover from: the error Telethon
    ended it with, if any (a transport -404, the server forgot the auth key, is AuthKeyNotFound:
    the session is dead, and a bare ConnectionError would cost one more connect to learn that),
    else a plain ConnectionError."""
    error = None if watched.cancelled() else watched.exception()
    if isinstance(error, Exception):
        return error
    return ConnectionError("connection closed")


def settle(fut: asyncio.Future[bool], ran_out: bool) -> None:
    """End a sleep's future with ``ran_out`` unless it has ended already."""
    if not fut.done():
        fut.set_result(ran_out)
