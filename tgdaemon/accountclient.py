"""An account's Telethon client object, from build to close.

One client object serves an account across its reconnects. It is built, with its listeners
(catch-up and unknown-object reports, the daemon's client hooks, the security watch), the
first time its worker connects; every connect is bounded by ``connect_timeout`` and every
close by :data:`CLOSE_TIMEOUT`. A client whose state is unknown (its connect hung, a stall mid
key exchange that leaves Telethon's sender half-way, or its close did not finish) is given
up, and the next connect builds a fresh one: the worker never waits on a wedged client. A
client given up, or left by an ended worker, goes to the daemon's reaper (tgdaemon.reaper),
which finishes and frees it. A worker's last close is paced (:meth:`AccountClient.paced`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from tgdaemon.telegram import ManagedClient, build_client
from tgdaemon.updates import observe_updates

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig
    from tgdaemon.reporter import AccountReporter
    from tgdaemon.session import StoreSession
    from tgdaemon.watch import AuthorizationWatch
    from tgdaemon.worker import WorkerDeps

#: Bound on tearing down a client: a wedged one is abandoned and replaced.
CLOSE_TIMEOUT = 5.0
#: Not the account's logger: a fleet-wide drop makes this one summary line
#: (logvolume.Noise.CLOSE_TIMEOUT), not one WARNING per account.
_close_log = logging.getLogger("tgdaemon.worker.close")


class AccountClient:
    """The current client of one account, if any (see module docstring)."""

    __slots__ = ("_account", "_deps", "_report", "current", "stop_began")

    def __init__(self, account: AccountConfig, deps: WorkerDeps,
                 report: AccountReporter) -> None:
        self._account = account
        self._deps = deps
        self._report = report
        self.current: ManagedClient | None = None
        #: Loop time at which the supervisor began the stop that ends this worker (None: no
        #: stop): its last close is paced from then, however late its cancellation came.
        self.stop_began: float | None = None

    def get(self, session: StoreSession, security: AuthorizationWatch | None) -> ManagedClient:
        """The current client, built (with its listeners) when there is none."""
        if self.current is None:
            client = build_client(self._deps.client_cls, session, self._deps.settings.current,
                                  self._account)
            observe_updates(client, self._report)
            for hook in self._deps.client_hooks:
                hook(self._account.name, client)
            if security is not None:
                security.attach(client)
            self.current = client
        return self.current

    async def connect(self, client: ManagedClient, timeout: float) -> None:
        """Connect ``client`` within ``timeout``; on any failure it is closed first."""
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives as connect() fails, and the stopped worker would reconnect forever.
            async with asyncio.timeout(timeout):
                await client.connect(validate=True)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, TimeoutError):
                # A connect that hung leaves Telethon's sender in an unknown state: abandon
                # this client object, build a fresh one next time.
                self.drop()
            raise

    async def close(self) -> None:
        """Disconnect the current client within :data:`CLOSE_TIMEOUT`; one that does not
        close in time is dropped, never awaited forever."""
        client = self.current
        if client is None:
            return
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):  # not wait_for: see connect
                await client.disconnect()
        except Exception as exc:
            name = self._account.name
            _close_log.warning("client did not close cleanly (%s); replacing it: %s",
                               type(exc).__name__, name, extra={"account": name})
            self.drop()

    @contextlib.asynccontextmanager
    async def paced(self) -> AsyncIterator[None]:
        """One of the daemon's connects-in-flight slots, for a worker's last close: a stop
        ends every worker at once, and 5,000 closes at once each outlasted CLOSE_TIMEOUT
        (bench/stopdrain.py). TimeoutError when none comes while the close could still end
        within ``drain_timeout`` of the stop's start (:attr:`stop_began`): the worker then
        drops the client, connection aborted."""
        slots = self._deps.limiter.in_flight
        if slots is None:
            yield
            return
        began = self.stop_began
        if began is None:
            began = asyncio.get_running_loop().time()
        wait = self._deps.settings.current.daemon.drain_timeout - CLOSE_TIMEOUT
        async with asyncio.timeout_at(began + max(0.0, wait)):
            await slots.acquire()
        try:
            yield
        finally:
            slots.release()

    def drop(self) -> None:
        """Let go of the current client: the reaper finishes what its close left undone and
        frees it (tgdaemon.reaper); the next connect builds a fresh one."""
        client, self.current = self.current, None
        if client is not None:
            self._deps.reaper.take(client)
