"""The supervisor: owns one worker task per enabled account, restarts stuck ones, applies reloads.

Every task it starts it also cancels and awaits. Workers handle their own errors, so the tasks
are kept in a plain dict rather than a TaskGroup (whose first failure would cancel every sibling).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tgdaemon.accountclient import CLOSE_TIMEOUT
from tgdaemon.config import diff_config
from tgdaemon.exceptions import AccountError, DecryptionError, StoreError
from tgdaemon.lifecycle import STALL_WORKERS, watchdog_restarts
from tgdaemon.logvolume import Waves
from tgdaemon.reporter import AccountReporter
from tgdaemon.tasks import in_passes
from tgdaemon.wheel import WAKE_BATCH
from tgdaemon.worker import AccountWorker, WorkerDeps

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, Config
    from tgdaemon.metrics import Metrics
    from tgdaemon.status import StatusBoard
    from tgdaemon.store import SessionData
    from tgdaemon.telegram import ManagedClient

log = logging.getLogger("tgdaemon.supervisor")

#: Workers created between two yields to the event loop at start: creating them took 0.15 s
#: per 1,000 accounts under a profiler, so 10,000 in one go held the loop for about a second.
SPAWN_BATCH = 50
#: Workers cancelled between two yields to the event loop at a stop (the daemon's per-pass
#: fan-out bound): a cancelled worker runs its end (its client's close up to its first wait)
#: in the loop pass after its cancel, and 10,000 cancelled at once made that one pass of 3.7 s.
CANCEL_BATCH = WAKE_BATCH


@dataclass
class _Slot:
    worker: AccountWorker
    task: asyncio.Task[None]


class Supervisor:
    def __init__(self, deps: WorkerDeps, *, board: StatusBoard, metrics: Metrics) -> None:
        self.deps = deps
        self._board = board
        self._metrics = metrics
        self._slots: dict[str, _Slot] = {}
        #: Stopped workers that did not end (see _stop_many).
        self._stuck: dict[str, asyncio.Task[None]] = {}
        #: Stops in progress (cancel, wait, flush), per account: done when the stop is. A
        #: release of an account the watchdog is restarting waits for it, so the lease is
        #: never given away while that worker may still be connected.
        self._stops: dict[str, asyncio.Future[None]] = {}
        #: Accounts the watchdog stopped and will start again, unless released, removed or
        #: started by someone else meanwhile (their slot is empty in between).
        self._restarting: set[str] = set()
        #: One per configured account, kept across worker restarts.
        self._reporters: dict[str, AccountReporter] = {}
        #: Their per-account INFO lines in a fleet-wide wave: a few, then one summary.
        self._waves = Waves()

    @property
    def config(self) -> Config:
        return self.deps.settings.current

    # -- start / stop ----------------------------------------------------------------------

    async def start(
        self, sessions: Mapping[str, SessionData | DecryptionError] | None = None,
    ) -> None:
        """Start a worker for every enabled account, reading all sessions in one pass
        (``sessions``: what the caller just read)."""
        if sessions is None:
            sessions = await self.deps.store.load_sessions()
        for i, account in enumerate(self.config.accounts, 1):
            if account.enabled:
                self._spawn(account, sessions.get(account.name))
            else:
                self._reporter(account.name).disabled()
            if i % SPAWN_BATCH == 0:
                await asyncio.sleep(0)  # let the loop breathe (the first ones connect meanwhile)

    async def stop(self, timeout: float) -> None:
        """Cancel every worker and wait up to ``timeout`` for them to close their clients
        (those a watchdog restart is stopping too: none is started again)."""
        self._restarting.clear()
        in_flight = set(self._stops.values())
        await self._stop_many(list(self._slots), timeout)
        if in_flight:
            await asyncio.wait(in_flight, timeout=timeout)

    async def _stop_many(self, names: list[str], timeout: float) -> set[str]:
        """Cancel the workers and wait for them: ``timeout`` is when stragglers are reported;
        they are still awaited (their client close is bounded), so a replacement never runs
        beside a worker that may still hold the same auth key (AUTH_KEY_DUPLICATED).
        Returns the accounts whose worker still has not ended (a bug): kept in
        :meth:`stuck` until it does."""
        slots = [self._slots.pop(name) for name in names if name in self._slots]
        if not slots:
            return set()
        loop = asyncio.get_running_loop()
        stopped = loop.create_future()
        for slot in slots:
            self._stops[slot.worker.name] = stopped
        try:
            return await self._stop_slots(slots, loop.time(), timeout)
        finally:
            for slot in slots:
                name = slot.worker.name
                if self._stops.get(name) is stopped:
                    del self._stops[name]
                if not slot.task.done():  # also when this stop was cancelled itself
                    self._stuck[name] = slot.task
            stopped.set_result(None)

    async def _stop_slots(self, slots: list[_Slot], began: float, timeout: float) -> set[str]:
        """The stop itself: cancel in batches, wait, flush the sessions."""
        loop = asyncio.get_running_loop()
        await _cancel_in_batches(slots, began)
        tasks = [s.task for s in slots]
        _done, pending = await asyncio.wait(
            tasks, timeout=max(0.0, began + timeout - loop.time()))
        if pending:
            log.warning("%d workers did not stop within %.1fs; waiting for them", len(pending),
                        timeout)
            _done, pending = await asyncio.wait(pending, timeout=2 * CLOSE_TIMEOUT + 5)
            if pending:  # a worker ignoring cancellation is a bug: one summary line
                log.error("%d workers ignore cancellation", len(pending))
        flushes = [asyncio.ensure_future(s.worker.session.flush())
                   for s in slots if s.worker.session is not None]
        if flushes:
            _done, unflushed = await asyncio.wait(flushes, timeout=timeout)
            for fut in unflushed:
                fut.cancel()
            failed = len(unflushed) + sum(1 for f in _done if f.exception() is not None)
            if failed:
                log.error("%d sessions could not be flushed on stop", failed)
        for slot in slots:
            slot.worker.report.stopped()
        return {s.worker.name for s in slots if not s.task.done()}

    def stuck(self) -> set[str]:
        """Accounts whose stopped worker has still not ended (it may hold a connection)."""
        for name in [n for n, task in self._stuck.items() if task.done()]:
            del self._stuck[name]
        return set(self._stuck)

    def _reporter(self, name: str) -> AccountReporter:
        reporter = self._reporters.get(name)
        if reporter is None:
            reporter = AccountReporter(name, board=self._board, metrics=self._metrics,
                                       store=self.deps.store, clock=self.deps.clock,
                                       waves=self._waves)
            self._reporters[name] = reporter
        return reporter

    def _spawn(
        self, account: AccountConfig, session: SessionData | DecryptionError | None
    ) -> None:
        worker = AccountWorker(account, self.deps, self._reporter(account.name), session)
        task = asyncio.create_task(worker.run(), name=f"worker:{account.name}")
        self._slots[account.name] = _Slot(worker, task)

    # -- fleet mode (tgdaemon/fleet.py): accounts come and go with their leases -------------

    async def adopt(self, accounts: Sequence[AccountConfig]) -> None:
        """Start workers for accounts whose leases this daemon just took (sessions read in
        one pass); they join the running config's accounts so reloads and restarts see them."""
        for account in accounts:  # a worker left from an earlier lease: start afresh
            slot = self._slots.get(account.name)
            if slot is not None and slot.task.done():
                del self._slots[account.name]
        configured = {a.name for a in self.config.accounts}
        self._set_accounts((*self.config.accounts,
                            *(a for a in accounts if a.name not in configured)))
        # An account the watchdog is restarting is started by that restart.
        new = [a for a in accounts
               if a.name not in self._slots and a.name not in self._restarting]
        if not new:
            return
        sessions = await self.deps.store.load_sessions([a.name for a in new])
        for account in new:
            if account.name not in self._slots:
                self._spawn(account, sessions.get(account.name))

    async def release(self, names: Sequence[str], timeout: float) -> set[str]:
        """Stop the workers (connections closed, sessions flushed) and forget the accounts:
        their leases may be given away once this returns, except those of the returned
        accounts, whose worker did not end (it may still be connected)."""
        gone = set(names)
        self._restarting -= gone  # a watchdog restart in progress does not bring them back
        in_flight = {self._stops[n] for n in gone if n in self._stops}
        stuck = await self._stop_many([n for n in names if n in self._slots], timeout)
        if in_flight:  # the watchdog is stopping some of them: their stop must end first
            await asyncio.wait(in_flight, timeout=timeout)
        self._set_accounts(tuple(a for a in self.config.accounts if a.name not in gone))
        for name in gone & self._reporters.keys():
            self._reporters.pop(name).remove()
        return stuck | (gone & self.stuck())

    def _set_accounts(self, accounts: tuple[AccountConfig, ...]) -> None:
        self.deps.settings.current = dataclasses.replace(self.config, accounts=accounts)

    # -- watchdog --------------------------------------------------------------------------

    async def check(self) -> int:
        """Restart workers whose last progress is older than ``stale_after`` (unless they wait
        on purpose); returns how many were restarted. Workers that ended (parked, or stopped
        after their retries) are left alone: restarting them would be a retry loop."""
        policy = self.config.policy
        now = self.deps.monotonic()
        stale = [
            name for name, slot in self._slots.items()
            # An ended task (parked, stopped) is left alone: restarting it would be a retry loop.
            if not slot.task.done() and watchdog_restarts(
                slot.worker.report.state, now=now, last_progress=slot.worker.progress.last,
                waiting_until=slot.worker.progress.waiting_until, stale_after=policy.stale_after)
        ]
        ages = {name: now - self._slots[name].worker.progress.last for name in stale}
        # A paused or starved process stalls every worker at once: that is one line, not one
        # per account (the names go to DEBUG), and one fleet-wide count, not a series per
        # account (issue 17: a fleet-wide event costs no series per account).
        stall = len(stale) > STALL_WORKERS
        level = logging.DEBUG if stall else logging.WARNING
        for name, age in ages.items():
            log.log(level, "worker %s made no progress for %.0fs: restarting", name, age)
            if not stall:
                self._reporters[name].worker_restart()
        if stall:
            self._metrics.stall_restarts(len(stale))
            log.warning("%d workers made no progress for %.0fs or more (was the process paused "
                        "or starved of CPU?): restarting them", len(stale), min(ages.values()))
        # One stop for all of them: stuck workers are awaited together, not one by one.
        # While it runs the fleet may release some of them (their leases lost), a reload
        # remove or change them: only those still configured, and not started meanwhile,
        # start again.
        self._restarting.update(stale)
        if stale:
            await self._stop_many(stale, policy.connect_timeout)
        await self._start_restarting()
        return len(stale)

    async def _start_restarting(self) -> None:
        """Start the workers the watchdog stopped (this check's, and an earlier one's whose
        session could not be read: the database was down), each with its stored session."""
        names = [n for n in self._restarting if n not in self._stops]
        if not names:
            return
        try:
            sessions = await self.deps.store.load_sessions(names)
        except StoreError as exc:  # the next check tries again
            log.warning("%d worker(s) not restarted yet: %s", len(names), exc)
            return
        by_name = {a.name: a for a in self.config.accounts}
        for name in names:
            if name not in self._restarting:  # released or started meanwhile
                continue
            self._restarting.discard(name)
            account = by_name.get(name)
            if account is not None and account.enabled and name not in self._slots:
                self._spawn(account, sessions.get(name))

    # -- reload ----------------------------------------------------------------------------

    async def apply(self, new: Config) -> None:
        """Apply a new config as a diff: unchanged accounts keep their connection.

        The new config is one assignment to the holder every worker reads: policy changes
        reach running workers at their next step, and a heartbeat wait in progress is re-armed
        with the new interval. Changed Telegram settings (api id, servers) restart every
        account. Ended workers (parked, or stopped after their retries) get one fresh try: the
        operator may have logged them in or fixed what was wrong."""
        diff = diff_config(self.config, new)
        self.deps.settings.current = new
        self.deps.directory.configure(new.telegram.servers)
        changed = diff.changed
        if diff.telegram_changed:
            changed = tuple(sorted({*diff.changed, *diff.unchanged}))
        ended = [n for n, slot in self._slots.items()
                 if slot.task.done() and n not in diff.removed and n not in changed]
        await self._stop_many([n for n in (*diff.removed, *changed, *ended) if n in self._slots],
                              new.daemon.drain_timeout)
        if diff.policy_changed:
            for slot in self._slots.values():
                slot.worker.reschedule()
        # A restart by the watchdog in progress starts its accounts with the new settings.
        to_start = [n for n in (*diff.added, *changed, *ended) if n not in self._restarting]
        sessions = await self.deps.store.load_sessions() if to_start else {}
        # The running config now, not ``new``: a fleet's release or adoption during the awaits
        # above changed its accounts (a released account is not started again).
        current = {a.name: a for a in self.config.accounts}
        for name in to_start:
            account = current.get(name)
            if account is not None and name not in self._slots:
                self._spawn(account, sessions.get(name))
        for name in self._reporters.keys() - current.keys():
            self._reporters.pop(name).remove()
        for account in current.values():
            if not account.enabled:
                self._reporter(account.name).disabled()
        log.info("config applied: %d added, %d removed, %d changed, %d retried, %d unchanged",
                 len(diff.added), len(diff.removed), len(changed), len(ended),
                 0 if diff.telegram_changed else len(diff.unchanged))

    # -- library access --------------------------------------------------------------------

    def worker(self, name: str) -> AccountWorker:
        slot = self._slots.get(name)
        if slot is None:
            raise AccountError(f"account {name!r} is not running")
        return slot.worker

    async def client(self, name: str, timeout: float) -> ManagedClient:
        """The connected client of ``name``, waiting up to ``timeout`` for it to connect."""
        worker = self.worker(name)
        await asyncio.wait_for(worker.report.connected.wait(), timeout)
        assert worker.client is not None
        return worker.client


async def _cancel_in_batches(slots: list[_Slot], began: float) -> None:
    """Cancel the workers, :data:`CANCEL_BATCH` per loop pass. Should this be cancelled
    itself, the rest are cancelled at once: no worker is left running unowned."""

    def cancel(slot: _Slot) -> bool:
        slot.worker.stopping(began)
        slot.task.cancel()
        return True

    await in_passes(slots, cancel, CANCEL_BATCH)
