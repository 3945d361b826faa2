"""A local MTProto data centre for tests, demos and chaos runs: a stand-in, NOT Telegram.

Unmodified Telethon talks to it over TCP on loopback (real key exchange, real MTProto 2.0).
"""

from __future__ import annotations

from tgdaemon.localdc.faults import Fault
from tgdaemon.localdc.server import BANNER, LocalDC

__all__ = ["BANNER", "Fault", "LocalDC"]
