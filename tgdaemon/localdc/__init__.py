"""A local MTProto data centre for tests, demos and chaos runs: a stand-in, NOT Telegram.

Unmodified Telethon talks to it over TCP on loopback (real key exchange, real MTProto 2.0)::

    async with LocalDC(tmp_path / "dc", dcs=2) as dc:
        client = testing.make_client(dc)            # trusts dc's RSA key, points at DC 1
        user = await testing.login(client, dc, "+99966 1000001")
        dc.inject(Fault("rpc_error", method="users.getUsers", error="FLOOD_WAIT_30", times=1))

Counters key requests by TL name ("users.getUsers"); faults match TL names, Telethon class
names ("GetUsersRequest") or namespaced class names ("users.GetUsersRequest"); see
:mod:`tgdaemon.localdc.faults`.
"""

from __future__ import annotations

from tgdaemon.localdc.faults import Fault
from tgdaemon.localdc.server import BANNER, LocalDC

__all__ = ["BANNER", "Fault", "LocalDC"]
