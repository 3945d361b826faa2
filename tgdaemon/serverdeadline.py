"""The lease on one account's connection (fleet mode): the worker's side of tgdaemon/leases.py.

Several daemons share the fleet; an account's session may be used only while this daemon
holds its lease. The worker checks the lease before it connects and again once connected (the
lease may lapse meanwhile), and keeps the server's ``ping_delay_disconnect`` armed to the
lease's local deadline, sent first on every connection and re-armed with each heartbeat: a
paused or cut-off process cannot close its own connections, so the server closes them before
the next owner connects.

A busy process is not a paused one: the next heartbeat is due early enough to re-arm the
server's deadline :func:`~tgdaemon.leases.lag_allowance` before it passes, so an event-loop
lag shorter than that never lets the server close a healthy connection (bench/CLUSTER.md:
at 40,000 accounts, lags of 9-10 s in a takeover had the servers close thousands).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from telethon import functions

from tgdaemon.leases import LeaseGate, LeaseLostError, heartbeat_due


class ConnectionLease:
    """One account's lease as its worker uses it (only in fleet mode: one per worker)."""

    __slots__ = ("_gate", "_monotonic", "_name", "armed_until")

    def __init__(self, gate: LeaseGate, name: str, monotonic: Callable[[], float]) -> None:
        self._gate = gate
        self._name = name
        self._monotonic = monotonic
        #: When the server's deadline last sent passes (local clock; the server's timer starts
        #: when the ping arrives, so it passes no sooner there).
        self.armed_until = float("inf")

    @classmethod
    def of(cls, gate: LeaseGate | None, name: str, monotonic: Callable[[], float]
           ) -> ConnectionLease | None:
        """The account's lease in fleet mode (``gate``), None for a single daemon."""
        return None if gate is None else cls(gate, name, monotonic)

    def check(self) -> None:
        """Raise :class:`LeaseLostError` unless this daemon may use the session now."""
        if not self._gate.holds(self._name):
            raise LeaseLostError(self._name)

    def install(self, client: Any) -> None:
        """Send the server's deadline first on each connection of ``client``, before any use
        of the key."""
        client._sender.first_request = self.server_deadline

    def arm(self, client: Any) -> None:
        """Re-arm the server's deadline: close this connection when the lease's local deadline
        passes without a newer ping."""
        self.check()
        assert client is not None
        client._sender.send_unawaited(self.server_deadline())

    def heartbeat_due(self, began: float, due: float, interval: float) -> float:
        """``due``, or sooner to re-arm the server's deadline in time (see the module)."""
        return heartbeat_due(began, due, self.armed_until, self._gate.lag_allowance, interval)

    def server_deadline(self) -> Any:
        """The ``ping_delay_disconnect`` for the lease's local deadline as of now."""
        delay = self._gate.disconnect_delay(self._name)
        self.armed_until = self._monotonic() + delay
        return functions.PingDelayDisconnectRequest(
            ping_id=int(time.time() * 1e6), disconnect_delay=delay)
