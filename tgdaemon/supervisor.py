"""The supervisor: owns one worker task per enabled account, restarts stuck ones, applies reloads.

Every task it starts it also cancels and awaits. Workers handle their own errors, so the tasks
are kept in a plain dict rather than a TaskGroup (whose first failure would cancel every sibling).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tgdaemon.config import diff_config
from tgdaemon.exceptions import AccountError, DecryptionError
from tgdaemon.status import PARKED_STATES, State
from tgdaemon.worker import CLOSE_TIMEOUT, AccountWorker, WorkerDeps

if TYPE_CHECKING:
    from tgdaemon.config import AccountConfig, Config
    from tgdaemon.store import SessionData
    from tgdaemon.telegram import ManagedClient

log = logging.getLogger("tgdaemon.supervisor")

#: States in which a worker is expected to make progress (heartbeats, connect attempts).
WATCHED_STATES = frozenset(
    {State.STARTING, State.CONNECTING, State.CONNECTED, State.RECONNECTING})


@dataclass
class _Slot:
    worker: AccountWorker
    task: asyncio.Task[None]


class Supervisor:
    def __init__(self, deps: WorkerDeps) -> None:
        self.deps = deps
        self._slots: dict[str, _Slot] = {}

    # -- start / stop ----------------------------------------------------------------------

    async def start(self) -> None:
        """Start a worker for every enabled account, reading all sessions in one pass."""
        sessions = await self.deps.store.load_sessions()
        for account in self.deps.config.accounts:
            if account.enabled:
                self._spawn(account, sessions.get(account.name))
            else:
                self._mark_disabled(account.name)

    async def stop(self, timeout: float) -> None:
        """Cancel every worker and wait up to ``timeout`` for them to close their clients."""
        names = list(self._slots)
        await self._stop_many(names, timeout)

    async def _stop_many(self, names: list[str], timeout: float) -> None:
        """Cancel the workers and wait for them: ``timeout`` is when stragglers are reported;
        they are still awaited (their client close is bounded), so a replacement never runs
        beside a worker that may still hold the same auth key (AUTH_KEY_DUPLICATED)."""
        slots = [self._slots.pop(name) for name in names if name in self._slots]
        if not slots:
            return
        for slot in slots:
            slot.task.cancel()
        tasks = [s.task for s in slots]
        _done, pending = await asyncio.wait(tasks, timeout=timeout)
        if pending:
            log.warning("%d workers did not stop within %.1fs; waiting for them", len(pending),
                        timeout)
            _done, pending = await asyncio.wait(pending, timeout=2 * CLOSE_TIMEOUT + 5)
            if pending:  # pragma: no cover - a worker ignoring cancellation is a bug
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
            if slot.worker.state not in PARKED_STATES:
                slot.worker._set_state(State.STOPPED, "stopped")

    def _spawn(
        self, account: AccountConfig, session: SessionData | DecryptionError | None
    ) -> None:
        self.deps.metrics.add_account(account.name)
        worker = AccountWorker(account, self.deps, session)
        task = asyncio.create_task(worker.run(), name=f"worker:{account.name}")
        self._slots[account.name] = _Slot(worker, task)

    def _mark_disabled(self, name: str) -> None:
        self.deps.metrics.add_account(name)
        self.deps.board.update(name, state=State.DISABLED, reason="disabled in config")

    async def _load_session(self, name: str) -> SessionData | DecryptionError | None:
        try:
            return await self.deps.store.load_session(name)
        except DecryptionError as exc:
            return exc

    # -- fleet mode (tgdaemon/fleet.py): accounts come and go with their leases -------------

    async def adopt(self, accounts: Sequence[AccountConfig]) -> None:
        """Start workers for accounts whose leases this daemon just took (sessions read in
        one pass); they join ``deps.config.accounts`` so reloads and restarts see them."""
        new = [a for a in accounts if a.name not in self._slots]
        if not new:
            return
        self._set_accounts((*self.deps.config.accounts, *new))
        sessions = await self.deps.store.load_sessions([a.name for a in new])
        for account in new:
            self._spawn(account, sessions.get(account.name))

    async def release(self, names: Sequence[str], timeout: float) -> None:
        """Stop the workers (connections closed, sessions flushed) and forget the accounts:
        their leases may be given away once this returns."""
        gone = set(names)
        await self._stop_many([n for n in names if n in self._slots], timeout)
        self._set_accounts(tuple(a for a in self.deps.config.accounts if a.name not in gone))
        for name in gone:
            self.deps.board.remove(name)
            self.deps.metrics.remove_account(name)

    def _set_accounts(self, accounts: tuple[AccountConfig, ...]) -> None:
        config = dataclasses.replace(self.deps.config, accounts=accounts)
        self.deps = dataclasses.replace(self.deps, config=config)
        for slot in self._slots.values():
            slot.worker.deps = self.deps

    # -- watchdog --------------------------------------------------------------------------

    async def check(self) -> int:
        """Restart workers whose last progress is older than ``stale_after`` (unless they wait
        on purpose); returns how many were restarted. Workers that ended (parked, or stopped
        after their retries) are left alone: restarting them would be a retry loop."""
        policy = self.deps.config.policy
        now = self.deps.monotonic()
        stale: list[str] = []
        for name, slot in self._slots.items():
            worker = slot.worker
            if slot.task.done():
                continue  # parked or stopped on purpose: restarting would be a retry loop
            if worker.waiting_until is not None and now < worker.waiting_until + policy.stale_after:
                continue
            if worker.state in WATCHED_STATES and now - worker.last_progress > policy.stale_after:
                stale.append(name)
        for name in stale:
            log.warning("worker %s made no progress for %.0fs: restarting", name,
                        now - self._slots[name].worker.last_progress)
            self.deps.metrics.worker_restart(name)
        # One stop for all of them: stuck workers are awaited together, not one by one.
        await self._stop_many(stale, policy.connect_timeout)
        for name in stale:
            self._spawn(self.deps.config.account(name), await self._load_session(name))
        return len(stale)

    # -- reload ----------------------------------------------------------------------------

    async def apply(self, new: Config) -> None:
        """Apply a new config as a diff: unchanged accounts keep their connection.

        Policy changes reach running workers at their next step (they read ``deps.config``);
        changed Telegram settings (api id, servers) restart every account. Ended workers
        (parked, or stopped after their retries) get one fresh try: the operator may have
        logged them in or fixed what was wrong."""
        diff = diff_config(self.deps.config, new)
        self.deps = dataclasses.replace(self.deps, config=new)
        self.deps.directory.configure(new.telegram.servers)
        changed = diff.changed
        if diff.telegram_changed:
            changed = tuple(sorted({*diff.changed, *diff.unchanged}))
        ended = [n for n, slot in self._slots.items()
                 if slot.task.done() and n not in diff.removed and n not in changed]
        await self._stop_many([n for n in (*diff.removed, *changed, *ended) if n in self._slots],
                              new.daemon.drain_timeout)
        for slot in self._slots.values():
            slot.worker.deps = self.deps
        to_start = (*diff.added, *changed, *ended)
        sessions = await self.deps.store.load_sessions() if to_start else {}
        for name in to_start:
            self._spawn(new.account(name), sessions.get(name))
        names = {a.name for a in new.accounts}
        for name in {s.account for s in self.deps.board.snapshot()} - names:
            self.deps.board.remove(name)
            self.deps.metrics.remove_account(name)
        for account in new.accounts:
            if not account.enabled:
                self._mark_disabled(account.name)
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
        await asyncio.wait_for(worker.connected.wait(), timeout)
        assert worker.client is not None
        return worker.client
