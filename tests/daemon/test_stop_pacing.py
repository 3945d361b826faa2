"""A stop closes the accounts' connections through the connects-in-flight slots, not all at
once (at 5,000 accounts, all at once made every close outlast its timeout)."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import phone_for
from tgdaemon import supervisor as supervisor_module
from tgdaemon.accountclient import CLOSE_TIMEOUT, AccountClient
from tgdaemon.daemon import Daemon
from tgdaemon.status import State

NAMES = [f"pace{i}" for i in range(4)]


async def test_a_stop_closes_connections_a_few_at_a_time(
        make_config, login_account, localdc, wait_until, monkeypatch) -> None:
    config = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES],
                         daemon={"http_listen": "", "connect_concurrency": 1,
                                 "drain_timeout": 30.0})
    for name in NAMES:
        await login_account(config, name)
    closing, peak, closed = 0, 0, 0
    original = AccountClient.close

    async def counting(self: AccountClient) -> None:
        nonlocal closing, peak, closed
        if self.current is None or not self.current.is_connected():
            return await original(self)
        closing += 1
        peak = max(peak, closing)
        try:
            await original(self)
        finally:
            closing -= 1
            closed += 1

    daemon = Daemon(config)
    await daemon.start()
    try:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == len(NAMES), 30,
                         "all connected")
        monkeypatch.setattr(AccountClient, "close", counting)
    finally:
        started = time.monotonic()
        await daemon.stop()
    assert closed == len(NAMES)  # every connection closed, none dropped...
    assert peak == 1  # ...one at a time
    assert time.monotonic() - started < config.daemon.drain_timeout
    await wait_until(lambda: not localdc.key_use.live_counts(), 10, "the server saw them close")


async def test_a_close_that_gets_no_slot_in_time_drops_its_connection(
        make_config, login_account, localdc, wait_until, monkeypatch) -> None:
    """One slot, held by a close that hangs: the others do not queue behind it past the
    drain timeout; they drop their clients, whose connections end at once."""
    names = NAMES[:3]
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         daemon={"http_listen": "", "connect_concurrency": 1,
                                 "drain_timeout": CLOSE_TIMEOUT + 0.5})
    for name in names:
        await login_account(config, name)
    released = asyncio.Event()
    entered: list[str] = []
    original = AccountClient.close

    async def wedged(self: AccountClient) -> None:
        if self.current is not None and self.current.is_connected():
            entered.append(self._account.name)
            await released.wait()  # the first close holds the only slot until released
        await original(self)

    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == len(names), 30,
                         "all connected")
        supervisor = daemon.supervisor
        assert supervisor is not None
        reaper = supervisor.deps.reaper
        monkeypatch.setattr(AccountClient, "close", wedged)
        stopping = asyncio.ensure_future(supervisor.stop(config.daemon.drain_timeout))
        try:
            await wait_until(lambda: len(localdc.key_use.live_counts()) == 1, 10,
                             "the others' connections ended")
            assert len(entered) == 1  # only the slot's holder began a close...
            assert reaper.aborted == len(names) - 1  # ...the others were dropped
        finally:
            released.set()
            await stopping


async def test_a_stop_cancels_the_workers_a_batch_per_loop_pass(
        make_config, login_account, localdc, wait_until, monkeypatch) -> None:
    """10,000 workers cancelled in one loop pass held the loop for 3.7 s (each runs its end in
    the pass after its cancel): counted in loop passes, not seconds, a stop cancels at most
    CANCEL_BATCH per pass, and still drains within drain_timeout."""
    names = [f"batch{i}" for i in range(10)]
    monkeypatch.setattr(supervisor_module, "CANCEL_BATCH", 3)
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         daemon={"http_listen": "", "drain_timeout": 30.0})
    for name in names:
        await login_account(config, name)
    loop = asyncio.get_running_loop()
    cancelled: set[asyncio.Task[None]] = set()
    per_pass: list[int] = []

    def count_pass(tasks: list[asyncio.Task[None]]) -> None:  # once per loop pass
        before = len(cancelled)
        cancelled.update(t for t in tasks if t.cancelling() or t.cancelled())
        per_pass.append(len(cancelled) - before)
        if len(cancelled) < len(tasks):
            loop.call_soon(count_pass, tasks)

    daemon = Daemon(config)
    await daemon.start()
    try:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == len(names), 30,
                         "all connected")
        assert daemon.supervisor is not None
        tasks = [slot.task for slot in daemon.supervisor._slots.values()]
        count_pass(tasks)
    finally:
        started = time.monotonic()
        await daemon.stop()
    assert len(cancelled) == len(names)
    assert max(per_pass) <= 3, per_pass
    assert sum(1 for n in per_pass if n) >= 4  # 10 in batches of 3
    assert time.monotonic() - started < config.daemon.drain_timeout
    assert all(t.done() for t in tasks)
