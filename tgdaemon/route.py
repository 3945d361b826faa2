"""One account's route to its server: the DC address it uses (through its proxy, if any),
failing over to the DC's next address, and waiting its turn on a route that is down.

Apart from the worker because it is one concept with its own state (the network failures
counted towards a failover, the route a retry must wait its turn on) shared by the failure
path and the connect path; the fleet-wide view of routes is :mod:`tgdaemon.reachability`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Hashable
from typing import TYPE_CHECKING

from tgdaemon.retry import backoff_delay

if TYPE_CHECKING:
    from tgdaemon.config import PolicyConfig, Proxy
    from tgdaemon.dcs import DcDirectory
    from tgdaemon.reachability import Reachability
    from tgdaemon.reporter import AccountReporter
    from tgdaemon.session import StoreSession

#: A deliberate wait of the worker: ``delay`` seconds, or until the route is reached if sooner.
Wait = Callable[[float, Hashable], Awaitable[None]]


class AccountRoute:
    """The route of one account's session (see module docstring)."""

    __slots__ = ("_directory", "_proxy", "_reach", "_report", "_session", "network_failures",
                 "retry")

    def __init__(self, session: StoreSession, proxy: Proxy | None,
                 directory: DcDirectory, reach: Reachability, report: AccountReporter) -> None:
        self._session = session
        self._proxy = proxy
        self._directory = directory
        self._reach = reach
        self._report = report
        #: Consecutive network failures on the current address (cleared by a heartbeat).
        self.network_failures = 0
        #: The route of the network failure being retried: the next attempt waits its turn.
        self.retry: Hashable | None = None

    @property
    def key(self) -> Hashable:
        """The way this account reaches its server: the DC's address it uses, through its
        proxy if any."""
        s, proxy = self._session, self._proxy
        return (s.server_address, s.port, None if proxy is None else
                (proxy.scheme, proxy.host, proxy.port))

    def reached(self) -> None:
        """A connection succeeded: the accounts waiting on this route may go."""
        self._reach.reached(self.key)

    def failed(self, retry_in: float, policy: PolicyConfig) -> Hashable:
        """A network failure, retried in ``retry_in`` seconds: count it (failing over after
        ``failover_after`` in a row); return the route to retry on (the next address after a
        failover). The route is probed again within ``backoff_base`` at most
        (:func:`~tgdaemon.reachability.probe_spacing`)."""
        self._reach.failed(self.key, retry_in, policy.backoff_base)
        self.network_failures += 1
        if self.network_failures >= policy.failover_after:
            self.fail_over(self.network_failures)
        return self.key

    def fail_over(self, failures: int) -> bool:
        """Move to the DC's next address (after ``failures`` consecutive failures on this one,
        ours or, waiting for a probe, the fleet's); False when it has no other address."""
        session = self._session
        dc_id = session.dc_id
        addresses = self._directory.addresses(dc_id)
        if len(addresses) < 2:
            return False
        current = (session.server_address, session.port)
        index = addresses.index(current) if current in addresses else -1
        host, port = addresses[(index + 1) % len(addresses)]
        self._report.failover(dc_id, failures)
        session.set_dc(dc_id, host, port)
        self.network_failures = 0
        return True

    async def await_turn(self, policy: PolicyConfig, rng: random.Random, wait: Wait) -> None:
        """Retrying on a route that is down: attempt as its probe, or wait until an account
        reaches it (or, should no probe ever succeed, for a backoff of our own)."""
        route, self.retry = self.retry, None
        if route is None:
            return
        reach = self._reach
        waits = 0
        moved = False
        while not reach.claim(route, hold=policy.connect_timeout):
            failures = reach.failures(route)
            if not moved and failures >= policy.failover_after and self.fail_over(failures):
                # The fleet's failures on this address count: try the DC's next one now
                # rather than each account failing there on its own first (once per turn).
                moved = True
                route = self.key
                continue
            fallback = backoff_delay(waits, base=policy.backoff_base, cap=policy.backoff_cap,
                                     jitter=policy.backoff_jitter, rng=rng)
            waits += 1
            await wait(fallback, route)
