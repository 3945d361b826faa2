"""The owner's end of a background task: cancel it and wait until it has stopped."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["cancel_and_wait", "raise_if_cancelled"]


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
