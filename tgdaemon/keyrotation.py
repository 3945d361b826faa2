"""Online master-key rotation: stored sessions re-encrypted under the active key while the
daemon runs.

``tgdaemon rotate-key`` writes a ring with a new active key (the old keys kept); a reload
hands it to the store and starts this task, which re-encrypts a small batch per durable
transaction through the store's writer lock (workers' own writes wait at most one batch), and
says how many records are left in ``/status``'s summary, systemd's STATUS= line and
``tgdaemon_key_rotation_pending_records``. A SIGKILL leaves every record all old or all new,
readable with the ring on disk; the next start sees records under an older key and finishes.

In a fleet (tgdaemon/fleet.py) the records live in the shared store and every instance has its
own copy of the ring, so a new key must reach every instance before any record uses it: an
instance that lacks it could not read the accounts it takes over.  :class:`FleetKeys` publishes
the key ids of this instance's ring in the store and writes under the newest key that every
live instance holds (:func:`fleet_write_key`); only once that is its ring's active key does it
re-encrypt, batch by batch, each batch one transaction of the shared store that no other
instance's batch or session write interleaves with (SQLite's write lock; PostgreSQL's row locks,
``SKIP LOCKED`` so that instances share the work).  Order for an operator (README): rotate-key
writes the ring, install it on every instance and reload each; the fleet switches when the last
live instance has it; prune-keys refuses while any record or any registered instance still uses
the key to drop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from tgdaemon.exceptions import TgdaemonError
from tgdaemon.tasks import cancel_and_wait

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence

    from prometheus_client.metrics_core import Metric

    from tgdaemon.crypto import KeyRing
    from tgdaemon.leasestore import LeaseStore
    from tgdaemon.status import StatusBoard
    from tgdaemon.store import Store

__all__ = ["BATCH", "FleetKeys", "KeyRotation", "fleet_write_key"]

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
        #: Records this process re-encrypted since it started.
        self.reencrypted = 0
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
                self.reencrypted += done
                self.pending = left
                if left == 0:
                    break
                self._board.note = f"re-encrypting sessions: {left} left"
                await asyncio.sleep(self._pause)
        except TgdaemonError as exc:
            log.error("re-encrypting stored sessions stopped: %s (retried: in a fleet within "
                      "a renewal period, else at the next reload or start)", exc)
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


def fleet_write_key(ring_key_ids: Sequence[str], others: Iterable[Sequence[str]]) -> str:
    """The key a fleet instance writes records under: the first of its ring's keys (active
    first, then newest to oldest) that every other live instance holds too, so that whoever
    takes an account over can read its record; the active key when none is shared (a fleet
    with unrelated rings, reported by every instance's records check)."""
    rings = [set(o) for o in others]
    for key_id in ring_key_ids:
        if all(key_id in r for r in rings):
            return key_id
    return ring_key_ids[0]


class FleetKeys:
    """A fleet instance's side of a master key rotation (see the module docstring): owns the
    task that, every ``interval``, reads the instances' published rings, points the store at
    the agreed write key, publishes its own, and starts the re-encryption once the agreed key
    is the ring's active one."""

    def __init__(self, *, instance: str, leases: LeaseStore, store: Store,
                 rotation: KeyRotation, ring: KeyRing, ttl: float, interval: float) -> None:
        self._instance = instance
        self._leases = leases
        self._store = store
        self._rotation = rotation
        self.ring = ring
        self._ttl = ttl
        self._interval = interval
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned: tuple[str, ...] = ()
        #: Completed agreements (tests wait on it).
        self.agreements = 0

    @property
    def write_key(self) -> str:
        return self._store.keyring.active.key_id

    async def start(self) -> None:
        """Agree once before the fleet's first claim (others see our ring), then every
        ``interval``."""
        try:
            await self.agree()
        except TgdaemonError as exc:
            log.warning("master key agreement with the fleet failed: %s (retried)", exc)
        self._task = asyncio.create_task(self._run(), name="fleet-keys")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel_and_wait(task)

    def set_ring(self, ring: KeyRing) -> None:
        """A reload brought a new ring: it must keep every key of the running one (records
        under them must stay readable); it is used from the next agreement on."""
        self.ring.check_replacement(ring)
        self.ring = ring
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self.agree()
            except TgdaemonError as exc:  # the store unreachable: the fleet says so loudly
                log.debug("master key agreement failed: %s", exc)

    async def agree(self) -> None:
        ring = self.ring
        infos = await self._leases.instances()
        live = [i for i in infos
                if i.id != self._instance and i.renewed_ago < self._ttl and i.key_ids]
        write = fleet_write_key(ring.key_ids, (i.key_ids for i in live))
        store = self._store
        switched = write != store.keyring.active.key_id
        if switched or store.keyring.key_ids != ring.with_active(write).key_ids:
            store.set_keyring(ring.with_active(write))
            # Nothing is written under the previous key once we say we have switched.
            await store.flush()
        if write != ring.active.key_id:
            lacking = tuple(i.id for i in live if ring.active.key_id not in i.key_ids)
            if lacking != self._warned:
                self._warned = lacking
                log.warning("master key %s not used yet: instance(s) %s lack it (install the "
                            "new key ring there and reload); writing under key %s meanwhile",
                            ring.active.key_id, ", ".join(lacking) or "-", write)
        elif self._warned or switched:
            self._warned = ()
            log.info("every live instance holds master key %s: writing and re-encrypting "
                     "under it", write)
        # Published again whenever our row says otherwise (e.g. registered anew after an
        # operator's ``cluster forget``).
        own = next((i for i in infos if i.id == self._instance), None)
        if own is not None and (own.key_ids, own.write_key) != (ring.key_ids, write):
            await self._leases.publish_keys(self._instance, ring.key_ids, write)
        rotation = self._rotation
        if write == ring.active.key_id and not rotation.running and (
                switched or rotation.pending != 0):
            rotation.start()
        self.agreements += 1
