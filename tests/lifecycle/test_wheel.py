"""The heartbeat waits' shared timer wheel (tgdaemon.wheel): one loop timer per tick with
sleepers, not one per account, and waits that end on tick boundaries."""

from __future__ import annotations

import asyncio
import math
import struct
from collections import Counter
from typing import Any

import pytest
from telethon import errors as te

from tgdaemon.connwatch import ConnectionWatch
from tgdaemon.lifecycle import HEARTBEAT_JITTER, heartbeat_delay, heartbeat_tick
from tgdaemon.wheel import WAKE_BATCH, TimerWheel

TICK = 0.05


def _count_timers(loop: asyncio.AbstractEventLoop, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    armed: list[Any] = []
    call_at = loop.call_at

    def counting(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        armed.append(when)
        return call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counting)
    return armed


async def test_sleepers_due_in_one_tick_share_one_timer_and_wake_together(monkeypatch):
    loop = asyncio.get_running_loop()
    armed = _count_timers(loop, monkeypatch)
    wheel = TimerWheel()
    start = loop.time()
    # 200 accounts whose waits end anywhere within two ticks (made in one loop turn, as the
    # accounts due together are).
    sleepers = [wheel.sleeper(TICK * (1 + i / 100), TICK) for i in range(200)]
    assert len(armed) == wheel.pending <= 4  # one timer per boundary, not one per sleeper
    woke: list[float] = []
    for fut in sleepers:
        fut.add_done_callback(lambda _f: woke.append(loop.time()))
    assert all(await asyncio.gather(*sleepers))
    assert wheel.pending == 0
    for t in woke:
        assert t >= start + TICK  # never sooner than asked
    assert len(woke) == 200


def _pass_counter(loop: asyncio.AbstractEventLoop) -> tuple[list[int], Any]:
    passes = [0]

    def count_pass() -> None:  # runs once per loop pass
        passes[0] += 1
        loop.call_soon(count_pass)

    return passes, count_pass


async def test_a_boundary_wakes_a_batch_per_loop_pass_in_order():
    """Thousands due at once (a backlog of boundaries after a stall) are not all resumed in
    one loop pass: every timer and read would wait behind them."""
    loop = asyncio.get_running_loop()
    passes, count_pass = _pass_counter(loop)
    wheel = TimerWheel()
    sleepers = [wheel.sleeper(TICK, TICK) for _ in range(3 * WAKE_BATCH + 5)]
    sleepers[1].cancel()  # a cancelled one costs no wake-up
    woke: list[tuple[int, int]] = []
    for i, fut in enumerate(sleepers):
        fut.add_done_callback(lambda _f, i=i: woke.append((passes[0], i)))
    count_pass()
    await asyncio.gather(*sleepers[2:])
    await asyncio.sleep(0)  # the last done-callbacks run
    per_pass = Counter(p for p, _i in woke if _i != 1)
    assert max(per_pass.values()) == WAKE_BATCH
    assert len(per_pass) == 4
    assert [i for _p, i in woke if i != 1] == [i for i in range(len(sleepers)) if i != 1]


async def test_boundaries_due_in_one_pass_share_its_batch():
    """A loop that fell behind finds many boundaries due in one pass (here each sleeper its
    own boundary, all past by the next pass): together they wake WAKE_BATCH per pass, not a
    batch each."""
    loop = asyncio.get_running_loop()
    passes, count_pass = _pass_counter(loop)
    wheel = TimerWheel()
    sleepers = [wheel.sleeper(0.0, 0.0) for _ in range(2 * WAKE_BATCH + 1)]
    woke: list[int] = []
    for fut in sleepers:
        fut.add_done_callback(lambda _f: woke.append(passes[0]))
    count_pass()
    await asyncio.gather(*sleepers)
    await asyncio.sleep(0)  # the last done-callbacks run
    assert max(Counter(woke).values()) == WAKE_BATCH
    assert len(Counter(woke)) == 3


async def test_a_fleet_wide_drop_ends_the_sleeps_a_batch_per_loop_pass():
    loop = asyncio.get_running_loop()
    passes, count_pass = _pass_counter(loop)
    wheel = TimerWheel()
    drops = [loop.create_future() for _ in range(2 * WAKE_BATCH + 1)]  # one per connection

    class Client:
        def __init__(self, dropped: asyncio.Future[None]) -> None:
            self.disconnected = dropped

        def is_connected(self) -> bool:
            return False

    clients = [Client(d) for d in drops]
    watches = [ConnectionWatch(wheel) for _ in clients]
    for watch, client in zip(watches, clients, strict=True):
        watch.watch(client)
    sleeps = [asyncio.create_task(w.sleep(60, c, TICK))
              for w, c in zip(watches, clients, strict=True)]
    await asyncio.sleep(0)
    woke: list[int] = []
    for task in sleeps:
        task.add_done_callback(lambda _t: woke.append(passes[0]))
    count_pass()
    for dropped in drops:  # the server went away: every connection ends in one pass
        dropped.set_result(None)
    results = await asyncio.gather(*sleeps, return_exceptions=True)
    assert all(isinstance(r, ConnectionError) for r in results)
    await asyncio.sleep(0)
    assert max(Counter(woke).values()) <= WAKE_BATCH
    assert len(Counter(woke)) >= 3


@pytest.mark.parametrize(("ended", "raised"), [
    (te.AuthKeyNotFound(), te.AuthKeyNotFound),  # transport -404: the server forgot the key
    (te.InvalidBufferError(struct.pack("<i", -429)), te.InvalidBufferError),
    (None, ConnectionError),  # closed without an error
])
async def test_a_dropped_connection_ends_the_sleep_with_its_error(ended, raised):
    """The heartbeat wait raises what the connection ended with, so the worker recovers
    from the cause (a -404 parks at once) rather than from a bare ConnectionError."""
    dropped: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    class Client:
        disconnected = dropped

        def is_connected(self) -> bool:
            return False

    watch = ConnectionWatch(TimerWheel())
    watch.watch(Client())
    sleep = asyncio.create_task(watch.sleep(60, Client(), TICK))
    await asyncio.sleep(0)
    if ended is None:
        dropped.set_result(None)
    else:
        dropped.set_exception(ended)
    with pytest.raises(raised) as info:
        await sleep
    assert type(info.value) is raised
    if ended is not None:
        assert info.value is ended


async def test_a_woken_or_cancelled_sleep_leaves_the_others_alone():
    wheel = TimerWheel()
    early = ConnectionWatch(wheel)
    other = ConnectionWatch(wheel)
    loop = asyncio.get_running_loop()
    disconnected = loop.create_future()  # stands in for a client's connection

    class Client:
        @property
        def disconnected(self) -> asyncio.Future[None]:
            return disconnected

        def is_connected(self) -> bool:
            return True

    client = Client()
    early.watch(client)
    other.watch(client)
    woken = asyncio.create_task(early.sleep(10 * TICK, client, TICK))
    ran_out = asyncio.create_task(other.sleep(2 * TICK, client, TICK))
    cancelled = asyncio.create_task(wheel.sleep(2 * TICK, TICK))
    await asyncio.sleep(0)
    early.wake()
    cancelled.cancel()
    assert await woken is False
    assert await ran_out is True
    with pytest.raises(asyncio.CancelledError):
        await cancelled


def test_the_tick_keeps_a_wait_within_the_jitter_bound():
    """Rounding up to a tick never makes a wait longer than HEARTBEAT_JITTER intervals
    (the longest gap the watchdog and the config checks assume)."""
    import random

    rng = random.Random(7)
    for interval in (0.2, 30.0, 300.0):
        tick = heartbeat_tick(interval)
        assert 0 < tick <= interval / 30
        longest = max(heartbeat_delay(interval, rng) for _ in range(2000))
        assert math.ceil(longest / tick) * tick <= HEARTBEAT_JITTER * interval + 1e-9
