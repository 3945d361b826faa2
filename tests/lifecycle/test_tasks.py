"""Cancellation is never lost: the owner's stop ends a task even where Python 3.11's
``asyncio.wait_for`` (inside Telethon's connect) swallows it, and ``cancel_and_wait`` never
eats the caller's own cancellation."""

from __future__ import annotations

import asyncio

import pytest

from tgdaemon.tasks import cancel_and_wait, in_passes, raise_if_cancelled


async def test_a_cancellation_swallowed_by_wait_for_still_ends_the_task() -> None:
    loop = asyncio.get_running_loop()
    connected: asyncio.Future[int] = loop.create_future()
    went_on = asyncio.Event()

    async def worker() -> int:
        result = await asyncio.wait_for(connected, 10)  # Telethon: open_connection
        went_on.set()  # on 3.11 the cancel below was lost inside wait_for
        raise_if_cancelled()
        return result

    task = asyncio.create_task(worker())
    await asyncio.sleep(0)  # one loop turn: the task's first step, now inside wait_for
    connected.set_result(1)  # the connection opens ...
    task.cancel()  # ... in the same turn as the supervisor's stop
    done, _ = await asyncio.wait([task], timeout=5)
    assert done
    assert task.cancelled(), "the stopped worker went on"


async def test_cancel_and_wait_does_not_eat_the_owners_own_cancellation() -> None:
    release = asyncio.Event()
    after = asyncio.Event()

    async def slow_to_stop() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await release.wait()  # its cleanup takes a while

    async def owner(inner: asyncio.Task[None]) -> None:
        await cancel_and_wait(inner)
        after.set()

    inner = asyncio.create_task(slow_to_stop())
    await asyncio.sleep(0)
    outer = asyncio.create_task(owner(inner))
    await asyncio.sleep(0)  # the owner now awaits the inner task's end
    outer.cancel()  # the owner's owner stops it meanwhile
    release.set()
    done, _ = await asyncio.wait([outer], timeout=5)
    assert done
    assert outer.cancelled()
    assert not after.is_set()
    assert inner.cancelled()


async def test_cancel_and_wait_ends_a_task_quietly() -> None:
    task = asyncio.create_task(asyncio.Event().wait())
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(None)


async def test_in_passes_acts_per_pass_and_on_the_rest_when_cancelled() -> None:
    """At most ``per_pass`` acted on between two yields (items ``act`` skips cost nothing);
    cancelled between passes, every item left is acted on at once, none forgotten."""
    loop = asyncio.get_running_loop()
    passes = [0]
    stop = False

    def mark() -> None:
        passes[0] += 1
        if not stop:
            loop.call_soon(mark)

    acted: list[tuple[int, int]] = []

    def act(item: int) -> bool:
        if item % 5 == 0:
            return False  # skipped: does not count towards the pass
        acted.append((item, passes[0]))
        return True

    loop.call_soon(mark)
    await asyncio.sleep(0)
    await in_passes(range(40), act, 4)
    per_pass: dict[int, int] = {}
    for _item, p in acted:
        per_pass[p] = per_pass.get(p, 0) + 1
    assert len(acted) == 32
    assert max(per_pass.values()) == 4

    acted.clear()
    task = asyncio.create_task(in_passes(range(40), act, 4))
    await asyncio.sleep(0)  # the first slice, then it yields
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stop = True
    assert sorted(item for item, _p in acted) == [i for i in range(40) if i % 5]
