"""StatusBoard.update: what is stored, what is pushed to subscribers, when changed_at moves."""

from __future__ import annotations

from collections import Counter

import pytest

from tgdaemon.status import State, StatusBoard


def _pushed(sub) -> list:
    out = []
    while not sub._queue.empty():
        out.append(sub._queue.get_nowait())
    return out


@pytest.mark.parametrize(("changes", "pushed", "changed_at_moves"), [
    ({"latency": 0.5}, False, False),  # the heartbeat hot path: stored only
    ({"latency": 0.5, "state": State.CONNECTED}, False, False),  # same state: heartbeat only
    ({"state": State.CONNECTED}, False, False),  # nothing changed at all
    ({"state": State.RECONNECTING, "reason": "x"}, True, True),
    ({"reason": "other", "latency": 0.7}, True, False),  # a non-heartbeat field changed
    ({"dc_id": 4}, True, False),
])
async def test_update_pushes_only_real_changes(changes, pushed, changed_at_moves):
    now = [100.0]
    board = StatusBoard(clock=lambda: now[0])
    sub = board.subscribe()
    first = board.update("a", state=State.CONNECTED, reason="validated", dc_id=2)
    assert _pushed(sub) == [first]
    assert first.changed_at == 100.0
    now[0] = 200.0
    new = board.update("a", **changes)
    assert board.get("a") == new
    for key, value in changes.items():
        assert getattr(new, key) == value
    assert (_pushed(sub) == [new]) is pushed
    assert new.changed_at == (200.0 if changed_at_moves else 100.0)
    sub.close()


def test_counts_follow_every_change_without_a_walk() -> None:
    """counts() is read 10 times a second at any fleet size (the GC policy's census): it is
    kept as statuses change, and always equals a count over every status."""
    import random

    board = StatusBoard(clock=lambda: 0.0)
    rng = random.Random(17)
    states = list(State)
    names = [f"acct{i}" for i in range(40)]
    for _ in range(2_000):
        name = rng.choice(names)
        roll = rng.random()
        if roll < 0.1:
            board.remove(name)
        elif roll < 0.3:
            board.update(name, latency=rng.random())  # the heartbeat path
        else:
            board.update(name, state=rng.choice(states), reason="r")
        walked = Counter(s.state for s in board.snapshot())
        assert board.counts() == walked
    counts = board.counts()
    counts[State.CONNECTED] += 5  # a copy: the caller's changes stay the caller's
    assert board.counts() == Counter(s.state for s in board.snapshot())
