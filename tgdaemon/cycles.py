"""Reference cycles a failure leaves behind, cut so that reference counting frees them.

An exception's traceback holds every frame it went through, and those frames hold their
locals: the future or the object that stores the exception, the exception itself. That is a
cycle only the garbage collector frees, and :mod:`tgdaemon.gcpolicy` freezes the heap every
second: a cycle part of which is frozen is never collected (until the safety net's reclaim).
Measured on a steady fleet (bench/gcleak.py): each dropped connection and each FLOOD_WAIT
left ~13 such objects (the connection's error, stored in Telethon's ``disconnected`` future
and raised through the worker's heartbeat wait), one fleet-wide outage at 10,000 accounts
~110,000.
"""

from __future__ import annotations


def drop_frames(exc: BaseException | None) -> None:
    """Drop the tracebacks of ``exc`` and of the exceptions chained to it (kept: the types
    and messages, which is all a reader of an error handled already needs)."""
    seen: set[int] = set()  # one for the whole graph: a cause may lead back to a context
    stack = [exc]
    while stack:
        item = stack.pop()
        if item is None or id(item) in seen:
            continue
        seen.add(id(item))
        item.__traceback__ = None
        stack += (item.__cause__, item.__context__)
