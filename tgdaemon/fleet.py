"""This daemon's share of a fleet: claims, renews and releases leases, and runs their workers.

Three tasks:

* the renewer renews every lease we hold in one statement once per ``lease_renew_interval``,
  and nothing else: starting or closing hundreds of workers never delays a renewal;
* after each renewal the balancer closes the leases that did not come back, reads the fleet's
  counts, decides (tgdaemon/leases.py) how many to claim or give back, gives back first
  (workers closed and flushed *before* the lease is released), then claims and starts workers;
* the guard closes every worker when the leases' deadline passes unrenewed.

Safety: our leases are ours only until ``renewal start + ttl - close margin`` on our monotonic
clock.  A renewal that does not answer by then (database down, process paused) closes every
worker; a worker refuses to connect without a valid lease, and asks the server to drop its
connection by that deadline (``ping_delay_disconnect``) in case this process stops running.
Every session write carries the lease's epoch and is refused by the store once it is stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from tgdaemon.config import AccountConfig, Config
from tgdaemon.exceptions import AccountError, StoreError
from tgdaemon.leases import (
    Balance,
    ClusterView,
    LeaseTiming,
    MoveBudget,
    RenewalResult,
    balance,
    default_close_margin,
    disconnect_delay,
    must_close,
    next_renewal_in,
    renewal_result,
)
from tgdaemon.leasestore import NO_EPOCH, LeaseStore, Reencrypt
from tgdaemon.sqlitedb import WriteLockCollector
from tgdaemon.tasks import cancel_and_wait

if TYPE_CHECKING:
    from tgdaemon.store import Store
    from tgdaemon.supervisor import Supervisor

log = logging.getLogger("tgdaemon.fleet")


class StaleLeaseError(StoreError):
    """A session write was refused: the lease it was made under is no longer ours."""


class FleetMetrics:
    """The fleet's few series (bounded: no per-account label)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.owned = Gauge("tgdaemon_leases_owned", "Account leases this instance holds",
                           registry=registry)
        self.renewals = Counter("tgdaemon_lease_renewals", "Lease renewal rounds by result",
                                ["result"], registry=registry)
        for result in RenewalResult:
            self.renewals.labels(result.value)
        self.unowned = Gauge("tgdaemon_accounts_unowned",
                             "Enabled accounts of the fleet without a valid lease",
                             registry=registry)
        self.lost = Gauge("tgdaemon_instances_lost",
                          "Instances that stopped renewing without a clean stop",
                          registry=registry)
        self.fenced = Counter("tgdaemon_lease_fenced_writes",
                              "Session writes refused because their lease epoch was stale",
                              registry=registry)


def fleet_lock_name(config: Config) -> str:
    """One daemon per instance id: the lock file in the state directory names the id."""
    return instance_lock_name(config.daemon.instance_id)


def instance_lock_name(instance: str) -> str:
    return f"tgdaemon.{instance}.lock"


def account_spec(config: Config, name: str) -> AccountConfig:
    """The settings of a fleet account: its ``[[accounts]]`` entry when the config has one,
    else the defaults (accounts added with ``tgdaemon accounts add``)."""
    try:
        return config.account(name)
    except AccountError:
        return AccountConfig(name=name)


class Fleet:
    """See the module docstring.  Implements the worker's :class:`~tgdaemon.leases.LeaseGate`
    and the store's :class:`~tgdaemon.store.SessionRoute` (fenced session records)."""

    def __init__(
        self,
        *,
        config: Config,
        leases: LeaseStore,
        store: Store,
        registry: CollectorRegistry,
        monotonic: Callable[[], float],
        rng: random.Random | None = None,
    ) -> None:
        d = config.daemon
        self.config = config
        self.instance = d.instance_id
        self.leases = leases
        self._store = store
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self.timing = LeaseTiming(d.lease_ttl, d.lease_renew_interval,
                                  default_close_margin(d.lease_ttl))
        self._budget = MoveBudget(d.lease_moves_per_minute, monotonic())
        self.metrics = FleetMetrics(registry)
        # The daemons of one machine share the state database's write lock: how long this
        # one holds it (tgdaemon/sqlitedb.py) is what the others' renewals wait for.
        WriteLockCollector(registry, store.lock_stats)
        self.supervisor: Supervisor | None = None
        #: Leases we hold and run workers for: account -> epoch.
        self._epochs: dict[str, int] = {}
        self._valid_until = -1.0
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._wake = asyncio.Event()  # ends the loop's sleep early (stop)
        self._extended = asyncio.Event()  # the deadline moved (wakes the guard)
        self._renewed = asyncio.Event()  # a renewal succeeded (wakes the balancer)
        #: The last successful renewal's leases, for the balancer.
        self._latest: dict[str, int] | None = None
        #: Leases the renewer found gone, for the balancer to close.
        self._to_close: set[str] = set()
        #: Leases the guard closed: reopened if a later renewal finds them still ours.
        self._closed_by_guard: set[str] = set()
        #: Leases to give back once their stuck worker has ended (never while it may be
        #: connected): still renewed, so nobody else takes them meanwhile.
        self._held_back: set[str] = set()
        #: Leases given back whose release statement failed (retried each round).
        self._unreleased: set[str] = set()
        self.rounds = 0

    # -- LeaseGate --------------------------------------------------------------------------

    def holds(self, account: str) -> bool:
        return account in self._epochs and not must_close(self._monotonic(), self._valid_until)

    def disconnect_delay(self, account: str) -> int:
        return disconnect_delay(self._monotonic(), self._valid_until,
                                self.timing.transit_allowance)

    @property
    def lag_allowance(self) -> float:
        return self.timing.lag_allowance

    @property
    def owned(self) -> frozenset[str]:
        return frozenset(self._epochs)

    # -- SessionRoute -----------------------------------------------------------------------

    async def write_records(self, records: Mapping[str, bytes | None]
                            ) -> dict[str, BaseException]:
        writes = {n: (self._epochs.get(n, NO_EPOCH), r) for n, r in records.items()}
        rejected = await self.leases.write_sessions(self.instance, writes)
        if rejected:
            self.metrics.fenced.inc(len(rejected))
            log.warning("%d session write(s) refused: their leases belong to another instance "
                        "now", len(rejected))
        return {n: StaleLeaseError(f"session of {n!r} not written: lease lost")
                for n in rejected}

    async def read_records(self, names: Sequence[str] | None) -> dict[str, bytes]:
        return await self.leases.read_sessions(names)

    async def reencrypt_records(self, old_key_ids: Sequence[str], limit: int,
                                skip: Sequence[str], convert: Reencrypt) -> tuple[int, int]:
        return await self.leases.reencrypt(old_key_ids, limit, skip, convert)

    # -- lifecycle --------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Before the supervisor starts: put the config's accounts into the fleet, move this
        daemon's local sessions into a PostgreSQL fleet that lacks them, register."""
        config = self.config
        added = await self.leases.sync_accounts({a.name: a.enabled for a in config.accounts})
        if self.leases.kind != "sqlite":
            seeded = await self.leases.seed_sessions(await self._store.session_records())
            if seeded:
                log.info("copied %d local session(s) into the fleet's database", seeded)
        self._store.route_sessions(self)
        await self.leases.register(self.instance, config.daemon.capacity)
        log.info("instance %s joined the fleet (%s, %d account(s) added from the config, "
                 "capacity %d)", self.instance, self.leases.kind, added, config.daemon.capacity)

    def start(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._run(), name="tgdaemon-fleet"),
                       loop.create_task(self._renewer(), name="tgdaemon-fleet-renewer"),
                       loop.create_task(self._guard(), name="tgdaemon-fleet-guard")]

    async def stop(self, timeout: float) -> None:
        """A clean stop: workers closed and flushed, then every lease released at once so
        other instances take the accounts over without waiting for the TTL."""
        # The loop ends between rounds: cancelling a database call mid-transaction could
        # leave the connection unusable for the release below.
        self._stopping = True
        self._wake.set()
        self._renewed.set()
        others = self._tasks[2:]
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks[:2]), timeout=timeout)
            others.extend(pending)
        for task in others:
            await cancel_and_wait(task)
        self._tasks = []
        stuck: set[str] = set()
        # The guard's held-back accounts too: their worker may still be running.
        names = sorted(self._epochs.keys() | self._held_back)
        if self.supervisor is not None:
            stuck = await self.supervisor.release(names, timeout)
        await self._store.flush()
        try:
            if stuck:  # those expire after the TTL, when this process is long gone
                log.warning("%d worker(s) did not end: their leases are left to expire",
                            len(stuck))
                await asyncio.wait_for(self.leases.release(
                    self.instance, [n for n in names if n not in stuck]), timeout)
            else:
                await asyncio.wait_for(self.leases.unregister(self.instance), timeout)
        except (StoreError, TimeoutError) as exc:
            log.warning("leases not released (%s): other instances take them after the TTL",
                        type(exc).__name__)
        self._epochs.clear()
        self.metrics.owned.set(0)

    async def reload(self, new: Config) -> None:
        """A reload: new accounts of the config join the fleet; running workers get the new
        settings the way a single daemon's do."""
        assert self.supervisor is not None
        # [daemon] settings (capacity, lease timings) take effect at the next restart.
        self.config = new = dataclasses.replace(new, daemon=self.config.daemon)
        await self.leases.sync_accounts({a.name: a.enabled for a in new.accounts})
        owned = tuple(account_spec(new, n) for n in sorted(self._epochs))
        await self.supervisor.apply(_with_accounts(new, owned))

    def worker_config(self) -> Config:
        """The config the supervisor starts with: no accounts until leases are claimed."""
        return _with_accounts(self.config, ())

    # -- the loop ---------------------------------------------------------------------------

    async def _run(self) -> None:
        """The balancer: one round after each successful renewal."""
        # Daemons started together should see each other before the first claim.
        await self._sleep(self.timing.renew_interval * self._rng.uniform(0.5, 1.0))
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._renewed.wait(), self.timing.renew_interval)
            self._renewed.clear()
            if self._stopping:
                break
            try:
                await self.round()
            except StoreError as exc:  # the database is down: one line, the guard closes
                log.warning("lease round failed: %s", exc)
            except Exception:  # the balancer must survive anything; the guard closes
                log.exception("lease round failed")

    async def _renewer(self) -> None:
        while not self._stopping:
            started = self._monotonic()
            try:
                await self.renew()
            except Exception:  # e.g. a bug: no renewal, and the guard closes in time
                log.exception("lease renewal failed unexpectedly")
            await self._sleep(next_renewal_in(started, self._monotonic(),
                                              self.timing.renew_interval))

    async def renew(self) -> None:
        """Renew every lease we hold (one statement) and move the deadline."""
        started = self._monotonic()
        held = set(self._epochs)  # before the statement: a claim committing meanwhile is kept
        try:
            renewed = await self.leases.renew(self.instance, self.timing.ttl)
        except StoreError as exc:
            self.metrics.renewals.labels(RenewalResult.ERROR.value).inc()
            log.warning("lease renewal failed: %s", exc)
            return
        valid_until = self.timing.valid_until(started)
        if must_close(self._monotonic(), valid_until):
            # It answered, but too late to be sure nobody else holds them by now: the guard
            # has closed (or is closing) everything; the next renewal reopens what is ours.
            self.metrics.renewals.labels(RenewalResult.ERROR.value).inc()
            log.warning("lease renewal answered too late (%.1f s)", self._monotonic() - started)
            return
        self.metrics.renewals.labels(renewal_result(held, set(renewed)).value).inc()
        lost = held - set(renewed)
        for name in lost:  # refused at once by holds(); closed by the balancer
            self._epochs.pop(name, None)
        self._to_close |= lost
        self._latest = renewed
        self._set_deadline(valid_until)
        self._renewed.set()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _guard(self) -> None:
        """Close every worker when the leases' local deadline passes unrenewed, whatever the
        loop is waiting for (a database call that hangs, a pause just ended)."""
        while True:
            self._extended.clear()
            left = self._valid_until - self._monotonic()
            if self._epochs and left <= 0:
                await self._close_all()
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._extended.wait(), left if self._epochs else None)

    def _set_deadline(self, valid_until: float) -> None:
        self._valid_until = valid_until
        self._extended.set()

    async def round(self) -> None:
        """One balancing round after a renewal (see the module docstring)."""
        self.rounds += 1
        lost = sorted(self._to_close)
        self._to_close.clear()
        if lost:
            log.warning("%d lease(s) lost (expired, taken over, disabled or removed): closing "
                        "them", len(lost))
            await self._close(lost)
        renewed = self._latest
        if renewed is None or must_close(self._monotonic(), self._valid_until):
            return  # no valid renewal to act on
        await self._give_back_ended()
        regained = {n: e for n, e in renewed.items()
                    if n in self._closed_by_guard and n not in self._epochs}
        self._closed_by_guard.clear()
        if regained:  # still ours after an outage that closed them
            log.info("%d lease(s) still ours after an outage: reopening them", len(regained))
            await self._adopt(regained)
        if self._unreleased:  # given back here, but the release did not reach the store
            await self._release(sorted(self._unreleased))
        ttl = self.timing.ttl
        counts = await self.leases.counts(ttl)
        self.metrics.lost.set(counts.lost_instances)
        view = ClusterView(counts.accounts, counts.live_instances, len(self._epochs),
                           counts.claimable)
        decision = balance(view, self.config.daemon.capacity,
                           self._budget.available(self._monotonic()))
        claimed = await self._apply(decision)
        self.metrics.unowned.set(max(0, counts.claimable - claimed))
        self.metrics.owned.set(len(self._epochs))

    async def _apply(self, decision: Balance) -> int:
        if decision.release:
            candidates = sorted(set(self._epochs) - self._held_back)
            names = self._rng.sample(candidates, min(decision.release, len(candidates)))
            log.info("giving back %d account(s) to balance the fleet", len(names))
            self._budget.spend(len(names))
            # Closed and flushed before anybody may claim them; a worker that did not end
            # keeps its lease until it has.
            self._held_back |= await self._close(names)
            free = [n for n in names if n not in self._held_back]
            for name in free:
                self._epochs.pop(name, None)
            await self._release(free)
        if not decision.claim:
            return 0
        claim_started = self._monotonic()
        claimed = await self.leases.claim(self.instance, decision.claim, self.timing.ttl)
        if claimed and not must_close(self._monotonic(), self.timing.valid_until(claim_started)):
            log.info("claimed %d account(s)", len(claimed))
            await self._adopt(claimed)
        elif claimed:  # too slow to be safe: give them back untouched
            await self._release(list(claimed))
        return len(claimed)

    async def _adopt(self, leases: Mapping[str, int]) -> None:
        """Start workers for these leases; a lease is ours in :attr:`_epochs` only once its
        worker can start, else it is given back (never held, renewed, and not run).  An
        account whose previous worker has not ended is not started beside it (same auth key):
        its lease is given back once that worker has ended."""
        assert self.supervisor is not None
        stuck = leases.keys() & self.supervisor.stuck()
        if stuck:
            self._held_back |= stuck
            leases = {n: e for n, e in leases.items() if n not in stuck}
            if not leases:
                return
        try:
            await self._store.ensure_accounts(dict.fromkeys(leases))
        except StoreError as exc:
            log.warning("%d lease(s) given back: the local state database refused them (%s)",
                        len(leases), exc)
            await self._release(list(leases))
            return
        self._epochs.update(leases)
        # The guard may have last looked while we held nothing (it then waits for no deadline).
        self._extended.set()
        await self.supervisor.adopt([account_spec(self.config, n) for n in sorted(leases)])

    async def _close(self, names: Sequence[str]) -> set[str]:
        """Close the workers; returns those that did not end (see Supervisor.release)."""
        assert self.supervisor is not None
        return await self.supervisor.release(names, self.config.daemon.drain_timeout)

    async def _give_back_ended(self) -> None:
        """Release the held-back leases whose stuck worker has ended by now."""
        if not self._held_back:
            return
        assert self.supervisor is not None
        ended = self._held_back - self.supervisor.stuck()
        if ended:
            for name in ended:
                self._epochs.pop(name, None)
            self._held_back -= ended
            await self._release(sorted(ended))

    async def _release(self, names: Sequence[str]) -> None:
        """Give back leases no worker runs (any more).  If the store does not answer they stay
        in :attr:`_unreleased`, retried each round: never held, renewed and not run."""
        if not names:
            return
        self._unreleased.update(names)
        await self.leases.release(self.instance, names)
        self._unreleased.difference_update(names)

    async def _close_all(self) -> None:
        """The guard's close: every worker stopped (the supervisor cancels and awaits them).
        A worker that did not end may still be connected: its account is not reopened beside
        it, and its lease is given back only once it has ended (:meth:`_give_back_ended`)."""
        log.error("leases could not be renewed in time: closing all %d account(s) before they "
                  "expire", len(self._epochs))
        names = sorted(self._epochs)
        self._set_deadline(-1.0)  # nothing connects from here on
        stuck = await self._close(names)
        for name in names:
            self._epochs.pop(name, None)
        self._held_back |= stuck
        self._closed_by_guard.update(n for n in names if n not in stuck)
        self.metrics.owned.set(0)


def _with_accounts(config: Config, accounts: tuple[AccountConfig, ...]) -> Config:
    return dataclasses.replace(config, accounts=accounts)
