"""CatchUpBox as a table: what each difference answer reports, and the saved state never
running ahead of the handlers. Real Telethon TL objects and MessageBox, no network."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

import pytest
from telethon._updates.entitycache import EntityCache
from telethon._updates.messagebox import ENTRY_ACCOUNT
from telethon._updates.session import SessionState
from telethon.tl import types

from tgdaemon.updates import CatchUp, CatchUpBox

NOW = datetime.now(UTC).replace(microsecond=0)
START = 10


def _box() -> tuple[CatchUpBox, list[CatchUp]]:
    box = CatchUpBox(logging.getLogger("test.messagebox"))
    box.load(SessionState(0, 0, False, START, 0, int(NOW.timestamp()), 0, None), [])
    reports: list[CatchUp] = []
    box.on_catch_up = reports.append
    return box, reports


def _messages(first_id: int, n: int) -> list[types.Message]:
    return [types.Message(id=first_id + i, peer_id=types.PeerUser(777000), date=NOW,
                          message="m") for i in range(n)]


def _state(pts: int) -> types.updates.State:
    return types.updates.State(pts=pts, qts=0, date=NOW, seq=0, unread_count=0)


def _difference(n: int, pts: int) -> Any:
    return types.updates.Difference(new_messages=_messages(1, n), new_encrypted_messages=[],
                                    other_updates=[], chats=[], users=[], state=_state(pts))


def _slice(n: int, pts: int) -> Any:
    return types.updates.DifferenceSlice(new_messages=_messages(1, n), new_encrypted_messages=[],
                                         other_updates=[], chats=[], users=[],
                                         intermediate_state=_state(pts))


@pytest.mark.parametrize(("answers", "expected"), [
    ([types.updates.DifferenceEmpty(date=NOW, seq=0)], [CatchUp(0, 0)]),
    ([_difference(3, START + 3)], [CatchUp(3, 0)]),
    # slices are one catch-up: one report when the final difference arrives
    ([_slice(2, START + 2), _slice(2, START + 4), _difference(1, START + 5)], [CatchUp(5, 0)]),
    ([types.updates.DifferenceTooLong(pts=START + 40)], [CatchUp(0, 40)]),
])
async def test_reports_per_catch_up(answers: list[Any], expected: list[CatchUp]) -> None:
    box, reports = _box()
    box.try_begin_get_diff(ENTRY_ACCOUNT, "test")
    for answer in answers:
        assert ENTRY_ACCOUNT in box.getting_diff_for
        assert box.account_pts() is None  # a catch-up in progress is not a stalled stream
        box.apply_difference(answer, EntityCache())
    assert reports == expected
    assert ENTRY_ACCOUNT not in box.getting_diff_for


async def test_saved_state_waits_for_the_handlers() -> None:
    box, _reports = _box()
    box.try_begin_get_diff(ENTRY_ACCOUNT, "test")
    updates, _users, _chats = box.apply_difference(_difference(3, START + 3), EntityCache())
    assert box.account_pts() == START + 3  # the box itself moved on
    for _ in updates:  # Telethon hands each accepted update to the handlers
        assert box.session_state()[0]["pts"] == START, "saved ahead of the handlers"
        box.dispatched()
    assert box.session_state()[0]["pts"] == START + 3

    # A live batch is the same: until its handlers ran, the state before it is the saved one.
    live = types.Updates(updates=[types.UpdateNewMessage(message=_messages(4, 1)[0],
                                                         pts=START + 4, pts_count=1)],
                         users=[], chats=[], date=NOW, seq=0)
    accepted: list[Any] = []
    box.process_updates(live, EntityCache(), accepted)
    assert len(accepted) == 1
    assert box.session_state()[0]["pts"] == START + 3
    # A disconnect now: the loaded state (what the session saved) re-fetches the update.
    box.load(SessionState(0, 0, False, box.session_state()[0]["pts"], 0,
                          int(NOW.timestamp()), 0, None), [])
    assert box.session_state()[0]["pts"] == START + 3
