"""localdc's update history with stock Telethon: getDifference (slices, too long),
channel pts and getChannelDifference, persistence across a localdc restart."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from telethon import errors, events, functions, types
from telethon.sessions import StringSession

from tgdaemon.localdc import Fault, LocalDC
from tgdaemon.localdc.testing import login, point_session


def _collect(into: list[str]) -> Callable[[events.NewMessage.Event], Awaitable[None]]:
    async def handler(event: events.NewMessage.Event) -> None:
        into.append(event.raw_text)
    return handler


def _texts(diff: object) -> list[str]:
    return [m.message for m in diff.new_messages]  # type: ignore[attr-defined]


async def test_difference_from_every_pts_slices_and_too_long(tmp_path: Path, clients, phone,
                                                             isolated_telethon):
    async with LocalDC(tmp_path / "dc", history_limit=25, slice_limit=10) as dc:
        client = clients(dc)
        me = await login(client, dc, phone)
        start = (await client(functions.updates.GetStateRequest())).pts
        for i in range(23):
            dc.push_update(me.id, f"m{i}")
        state = await client(functions.updates.GetStateRequest())
        assert state.pts == start + 23

        def diff(pts: int, limit: int | None = None) -> object:
            return client(functions.updates.GetDifferenceRequest(
                pts=pts, date=datetime.now(UTC), qts=0, pts_total_limit=limit))

        empty = await diff(state.pts)
        assert isinstance(empty, types.updates.DifferenceEmpty)
        # Walk the slices as a client must: each intermediate state is the next request's pts.
        got: list[str] = []
        pts = start
        answers = []
        while True:
            answer = await diff(pts)
            answers.append(type(answer).__name__)
            got += _texts(answer)
            if isinstance(answer, types.updates.DifferenceSlice):
                assert answer.intermediate_state.pts == pts + 10
                pts = answer.intermediate_state.pts
                continue
            assert isinstance(answer, types.updates.Difference)
            assert answer.state.pts == state.pts
            break
        assert answers == ["DifferenceSlice", "DifferenceSlice", "Difference"]
        assert got == [f"m{i}" for i in range(23)]
        # The client's own limit, and a pts older than the 25 kept entries: "too long".
        too_long = await diff(start, limit=5)
        assert isinstance(too_long, types.updates.DifferenceTooLong)
        assert too_long.pts == state.pts
        for i in range(5):
            dc.push_update(me.id, f"n{i}")
        forgotten = await diff(start + 1)
        assert isinstance(forgotten, types.updates.DifferenceTooLong)
        kept = await diff(start + 3)  # exactly the oldest kept entry's starting point
        assert _texts(kept) == [f"m{i}" for i in range(3, 13)]
        with pytest.raises(errors.PersistentTimestampInvalidError):
            await diff(state.pts + 100)


async def test_client_catches_up_after_being_away_and_after_localdc_restart(
        tmp_path: Path, clients, phone, wait_until, isolated_telethon):
    """A stock client with catch_up=True gets every message sent while it was offline, in
    order, even after the local DC itself restarted (its history is persisted)."""
    dc = LocalDC(tmp_path / "dc", slice_limit=4)
    await dc.start()
    try:
        first = clients(dc)
        me = await login(first, dc, phone)
        await first.disconnect()  # saves the update state into the (memory) session
        session = first.session
        for i in range(3):
            dc.push_update(me.id, f"a{i}")
        await dc.stop()
        dc = LocalDC(tmp_path / "dc", slice_limit=4)
        await dc.start()
        for i in range(7):
            dc.push_update(me.id, f"b{i}")
        point_session(session, dc)
        got: list[str] = []
        second = clients(dc, session=session, catch_up=True)
        second.add_event_handler(_collect(got), events.NewMessage())
        await second.connect()
        want = [f"a{i}" for i in range(3)] + [f"b{i}" for i in range(7)]
        await wait_until(lambda: got == want, 10, "missed messages delivered in order")
        assert dc.counters()["requests"]["updates.getDifference"] >= 3  # slices of 4
    finally:
        await dc.stop()


async def test_channel_posts_reach_members_and_are_caught_up(localdc: LocalDC, clients, phone,
                                                             wait_until):
    client = clients(localdc, catch_up=True)
    me = await login(client, localdc, phone)
    other = clients(localdc)
    stranger = await login(other, localdc, "+999 66 1000002")
    cid = localdc.create_channel("news", [me.id])
    got: list[str] = []
    client.add_event_handler(_collect(got), events.NewMessage())
    localdc.post_to_channel(cid, "live 1")
    await wait_until(lambda: got == ["live 1"], 10, "live channel post")

    channel = await client.get_input_entity(types.PeerChannel(cid))
    assert isinstance(channel, types.InputChannel) or hasattr(channel, "access_hash")
    inp = types.InputChannel(cid, channel.access_hash)

    def channel_diff(c: object, pts: int, limit: int = 100) -> object:
        return c(functions.updates.GetChannelDifferenceRequest(  # type: ignore[operator]
            channel=inp, filter=types.ChannelMessagesFilterEmpty(), pts=pts, limit=limit))

    empty = await channel_diff(client, 2)
    assert isinstance(empty, types.updates.ChannelDifferenceEmpty)
    assert empty.pts == 2
    with pytest.raises(errors.ChannelPrivateError):
        await channel_diff(other, 1)
    assert stranger.id != me.id

    await client.disconnect()  # saves the channel's pts and access hash into the session
    session = client.session
    for i in range(3):
        localdc.post_to_channel(cid, f"away {i}")
    other_client = clients(localdc, session=StringSession(StringSession.save(session)))
    await other_client.connect()
    diff = await channel_diff(other_client, 2)
    assert [m.message for m in diff.new_messages] == ["away 0", "away 1", "away 2"]
    assert diff.final
    assert diff.pts == 5
    too_long = await channel_diff(other_client, 2, limit=1)
    assert isinstance(too_long, types.updates.ChannelDifferenceTooLong)
    await other_client.disconnect()

    # A stock client that keeps channel states in its session catches up on its own:
    # getDifference announces the channel (updateChannelTooLong), then getChannelDifference.
    back = clients(localdc, session=session, catch_up=True)
    got2: list[str] = []
    back.add_event_handler(_collect(got2), events.NewMessage())
    await back.connect()
    await wait_until(lambda: got2 == ["away 0", "away 1", "away 2"], 10, "channel catch-up")
    assert localdc.counters()["requests"]["updates.getChannelDifference"] >= 2


async def test_unknown_update_is_kept_in_history_and_survives_a_restart(
        tmp_path: Path, clients, phone, isolated_telethon):
    """An update of a newer layer is logged like any other (it takes a pts), so a stock
    client cannot parse a difference that holds it; pts_limit lets a client step past it."""
    dc = LocalDC(tmp_path / "dc")
    await dc.start()
    try:
        client = clients(dc)
        me = await login(client, dc, phone)
        start = (await client(functions.updates.GetStateRequest())).pts
        # Not pushed: stock Telethon would fetch the difference itself on the gap, fail to
        # parse it and disconnect (what tgdaemon.updates.step_past_unknown avoids).
        dc.inject(Fault("mute_updates", user_id=me.id))
        dc.push_unknown_update(me.id, 0x0BADF00D, b"\x00" * 4)
        dc.push_update(me.id, "after")

        async def check() -> None:
            with pytest.raises(errors.TypeNotFoundError):
                await client(functions.updates.GetDifferenceRequest(
                    pts=start, date=datetime.now(UTC), qts=0))
            with pytest.raises(errors.TypeNotFoundError):
                await client(functions.updates.GetDifferenceRequest(
                    pts=start, date=datetime.now(UTC), qts=0, pts_limit=1))
            rest = await client(functions.updates.GetDifferenceRequest(
                pts=start + 1, date=datetime.now(UTC), qts=0, pts_limit=1))
            assert _texts(rest) == ["after"]

        await check()
        await client.disconnect()
        await dc.stop()
        dc = LocalDC(tmp_path / "dc")
        await dc.start()
        point_session(client.session, dc)
        await client.connect()
        await check()
    finally:
        await dc.stop()
