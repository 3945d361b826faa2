"""Online master-key rotation: stored sessions re-encrypted under the active key while the
daemon runs.

``tgdaemon rotate-key`` writes a ring with a new active key (the old keys kept); a reload
hands it to the store and starts this task, which re-encrypts a small batch per durable
transaction through the store's writer lock (workers' own writes wait at most one batch), and
says how many records are left in ``/status``'s summary, systemd's STATUS= line and
``tgdaemon_key_rotation_pending_records``. A SIGKILL leaves every record all old or all new,
readable with the ring on disk; the next start sees records under an older key and finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tgdaemon.exceptions import TgdaemonError
from tgdaemon.tasks import cancel_and_wait

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from tgdaemon.status import StatusBoard
    from tgdaemon.store import Store

__all__ = ["BATCH", "KeyRotation"]

log = logging.getLogger("tgdaemon.keyrotation")

#: Records per transaction: ~1 ms of AES-GCM each way per record keeps a batch short enough
#: that a worker's session write never waits long behind it.
BATCH = 200
#: Between batches the writer's lock is free for the fleet's own writes.
PAUSE = 0.05


class KeyRotation(Collector):
    """Owns the background re-encryption task (see module docstring)."""

    def __init__(self, store: Store, board: StatusBoard, registry: CollectorRegistry, *,
                 batch: int = BATCH, pause: float = PAUSE) -> None:
        self._store = store
        self._board = board
        self._batch = batch
        self._pause = pause
        self._task: asyncio.Task[None] | None = None
        #: Records still under an older key at the last batch (None before the first).
        self.pending: int | None = None
        registry.register(self)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start re-encrypting, unless already at it (the running task reads the store's
        active key at every batch, so a second rotation joins the first)."""
        if not self.running:
            self._task = asyncio.create_task(self._run(), name="key-rotation")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    async def _run(self) -> None:
        store = self._store
        total = 0
        try:
            while True:
                done, left = await store.reencrypt_some(self._batch)
                total += done
                self.pending = left
                if left == 0:
                    break
                self._board.note = f"re-encrypting sessions: {left} left"
                await asyncio.sleep(self._pause)
        except TgdaemonError as exc:
            log.error("re-encrypting stored sessions stopped: %s (retried at the next reload "
                      "or start)", exc)
            return
        finally:
            self._board.note = None
        if total:
            log.info("re-encrypted %d session record(s) under key %s", total,
                     store.keyring.active.key_id)

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families())

    def _families(self) -> list[Metric]:
        return [GaugeMetricFamily(
            "tgdaemon_key_rotation_pending_records",
            "Stored session records still under an older master key (0 when none).",
            value=float(self.pending or 0))]
