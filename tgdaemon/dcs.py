"""Where each data centre can be reached: configured addresses first, then help.getConfig's.

One directory per daemon, shared by every worker: the dc_options list is fetched once (by the
first account to connect) and cached in the store, not once per account.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tgdaemon.store import Store

log = logging.getLogger("tgdaemon.dcs")

Address = tuple[str, int]

#: How long a fetched dc_options list is trusted before one worker refreshes it.
REFRESH_AFTER = 3600.0
#: After a failed refresh, how long before another worker tries.
RETRY_AFTER = 300.0


class DcDirectory:
    def __init__(
        self,
        configured: Mapping[int, Sequence[Any]],
        store: Store,
        *,
        use_ipv6: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._configured: dict[int, list[Address]] = {}
        self.configure(configured)
        self._learned: dict[int, list[Address]] = {}
        self._store = store
        self._use_ipv6 = use_ipv6
        self._monotonic = monotonic
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()

    def configure(self, configured: Mapping[int, Sequence[Any]]) -> None:
        """Set the configured addresses (``config.Address`` values), e.g. after a reload."""
        self._configured = {
            dc: [(a.host, a.port) for a in addrs] for dc, addrs in configured.items()}

    async def load(self) -> None:
        """Read the cached lists of every DC (called once at start-up)."""
        for dc_id in sorted(set(range(1, 6)) | set(self._configured)):  # Telegram has DCs 1-5
            cached = await self._store.dc_addresses(dc_id)
            if cached:
                self._learned[dc_id] = list(cached)

    def addresses(self, dc_id: int) -> list[Address]:
        """Ordered, de-duplicated: configured addresses win over learned ones."""
        merged = list(self._configured.get(dc_id, ()))
        merged += [a for a in self._learned.get(dc_id, ()) if a not in merged]
        return merged

    def needs_refresh(self) -> bool:
        return self._fetched_at is None or (
            self._monotonic() - self._fetched_at > REFRESH_AFTER)

    async def refresh(self, fetch: Callable[[], Awaitable[Any]]) -> None:
        """Learn the DCs from ``fetch()`` (help.getConfig) when the list is due: one caller
        fetches, the others wait and find it fresh. A failure is logged and postponed for
        everyone (the configured addresses still work)."""
        if not self.needs_refresh():
            return
        async with self._lock:
            if not self.needs_refresh():
                return
            try:
                await self.update_from_config(await fetch())
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._fetched_at = self._monotonic() - REFRESH_AFTER + RETRY_AFTER
                log.warning("could not refresh DC addresses: %s", type(exc).__name__)

    async def update_from_config(self, config: Any) -> None:
        """Take the dc_options of a help.getConfig result (telethon ``types.Config``)."""
        learned: dict[int, list[Address]] = {}
        for option in config.dc_options:
            if option.media_only or option.cdn or option.tcpo_only:
                continue
            if bool(option.ipv6) != self._use_ipv6:
                continue
            addr = (option.ip_address, option.port)
            bucket = learned.setdefault(option.id, [])
            if addr not in bucket:
                bucket.append(addr)
        for dc_id, addrs in learned.items():
            await self._store.save_dc_addresses(dc_id, addrs)
        self._learned = learned
        self._fetched_at = self._monotonic()
