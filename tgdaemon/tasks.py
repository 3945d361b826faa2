"""The owner's end of a background task: cancel it and wait until it has stopped."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

__all__ = ["cancel_and_wait", "in_passes", "raise_if_cancelled"]

_T = TypeVar("_T")


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (None: nothing to do) and await it, so nothing it holds outlives its
    owner's stop; its CancelledError is the expected end, not the caller's."""
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        raise_if_cancelled()  # the owner itself was cancelled meanwhile: not ours to eat


def raise_if_cancelled() -> None:
    """Raise CancelledError if the current task has a cancellation pending.

    Python 3.11's ``asyncio.wait_for`` returns the result instead of raising when a
    cancellation arrives as the awaited operation completes (Telethon's connect uses it):
    the task goes on as if never cancelled, while ``Task.cancelling()`` still counts the
    request. A loop that must end when cancelled calls this at its safe points."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def in_passes(items: Iterable[_T], act: Callable[[_T], bool], per_pass: int) -> None:
    """``act`` on every item, yielding to the event loop after every ``per_pass`` items it
    acted on (``act`` says whether it did): a fan-out to thousands (futures resolved, workers
    cancelled) wakes them over several loop passes, not in one that every other account waits
    behind. Cancelled between passes, it acts on the rest at once: none is left behind."""
    rest = iter(items)
    acted = 0
    try:
        for item in rest:
            if act(item):
                acted += 1
                if acted % per_pass == 0:
                    await asyncio.sleep(0)
    finally:
        for item in rest:
            act(item)
