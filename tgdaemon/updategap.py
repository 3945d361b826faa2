"""Whether a connection's updates still flow: each heartbeat's updates.getState against the
pts the client has processed.

Telegram pushes updates on the connection; a silent stall (the server stopped pushing, or
the client stopped processing) shows only as the server's pts running ahead of the client's.
A gap seen on ``update_gap_heartbeats`` heartbeats in a row is a gap: the first on a
connection is caught up (updates.getDifference fetches what was missed); a second one means
updates are not flowing, and the connection is started over (a NETWORK fault).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tgdaemon.telegram import ManagedClient, local_update_pts

if TYPE_CHECKING:
    from tgdaemon.reporter import AccountReporter


class UpdateStallError(ConnectionError):
    """Updates stopped arriving although the connection answers: reconnect (a NETWORK fault)."""


class UpdateGaps:
    """One worker's gap watch over its current connection (see module docstring)."""

    __slots__ = ("_catch_ups", "_streak")

    def __init__(self) -> None:
        self._streak = 0
        self._catch_ups = 0

    def connected(self) -> None:
        """A connection begins to serve: no gap seen on it, its one catch-up available."""
        self._streak = 0
        self._catch_ups = 0

    async def check(self, client: ManagedClient, server_pts: int, heartbeats: int,
                    report: AccountReporter) -> None:
        """After a heartbeat that told ``server_pts``; raises :class:`UpdateStallError` at the
        second gap on this connection."""
        local = local_update_pts(client)
        self._streak = self._streak + 1 if local is not None and server_pts > local else 0
        if self._streak < heartbeats:
            return
        self._streak = 0
        report.update_gap(server_pts, local)
        if self._catch_ups == 0:
            self._catch_ups += 1
            await client.catch_up()  # getDifference fetches what was missed
            return
        raise UpdateStallError("updates stopped arriving on this connection")
