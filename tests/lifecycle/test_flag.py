"""tgdaemon.flag.Flag: asyncio.Event's semantics, without a waiter deque while idle."""

from __future__ import annotations

import asyncio
import sys

import pytest

from tgdaemon.flag import Flag


async def test_set_wakes_every_waiter_and_wait_returns_at_once_when_set(wait_until):
    flag = Flag()
    assert not flag.is_set()
    waiters = [asyncio.create_task(flag.wait()) for _ in range(3)]
    await wait_until(lambda: len(flag._waiters or ()) == 3, 5, "three waiting")
    assert not any(w.done() for w in waiters)
    flag.set()
    flag.clear()  # cleared before they run: like asyncio.Event, they were woken all the same
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert not flag.is_set()
    flag.set()
    await asyncio.wait_for(flag.wait(), 1)  # set: no waiting
    assert Flag(True).is_set()


async def test_a_cancelled_waiter_is_forgotten(wait_until):
    flag = Flag()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(flag.wait(), 0.01)
    assert flag._waiters is None  # nothing kept for the next thousands of accounts
    other = asyncio.create_task(flag.wait())
    await wait_until(lambda: flag._waiters is not None, 5, "waiting")
    flag.set()
    await asyncio.wait_for(other, 5)


def test_smaller_than_an_event_while_idle():
    event = asyncio.Event()
    assert sys.getsizeof(Flag()) < sys.getsizeof(event._waiters)
