"""Private messages through localdc with stock Telethon: send between two users (by username
and by phone), history on both sides, dialogs, read receipts, edits and revoked deletions
arriving as updates."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from telethon import TelegramClient, events, functions
from telethon.tl import types as tl

from tests.conftest import WaitUntil
from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import login

PHONE_A = "+999 66 2000001"
PHONE_B = "+999 66 2000002"


async def _pair(localdc: LocalDC, clients: Callable[..., TelegramClient]
                ) -> tuple[TelegramClient, TelegramClient, Any, Any]:
    a, b = clients(localdc), clients(localdc)
    ua = await login(a, localdc, PHONE_A)
    ub = await login(b, localdc, PHONE_B)
    return a, b, ua, ub


async def test_send_by_username_and_phone_reaches_both_histories(
        localdc: LocalDC, clients: Callable[..., TelegramClient], wait_until: WaitUntil) -> None:
    a, b, ua, ub = await _pair(localdc, clients)
    got: list[Any] = []
    b.add_event_handler(lambda e: got.append(e.message), events.NewMessage())
    resolved = await a(functions.contacts.ResolveUsernameRequest(ub.username))
    assert resolved.peer == tl.PeerUser(ub.id)
    by_phone = await a(functions.contacts.ResolvePhoneRequest(PHONE_B.replace(" ", "")))
    assert by_phone.users[0].id == ub.id
    first = await a.send_message(ub.username, "hello over localdc")
    second = await a.send_message(ub.id, "second", reply_to=first.id)
    await wait_until(lambda: len(got) == 2, message="B receives both messages")
    assert [m.message for m in got] == ["hello over localdc", "second"]
    assert got[0].sender_id == ua.id
    assert not got[0].out
    # Each side has its own ids; the reply points at B's copy of the first message.
    assert got[1].reply_to.reply_to_msg_id == got[0].id
    mine = await a.get_messages(ub.id, limit=10)
    assert [m.message for m in mine] == ["second", "hello over localdc"]
    assert all(m.out for m in mine)
    assert mine[0].id == second.id
    theirs = await b.get_messages(ua.id, limit=1)
    assert [m.message for m in theirs] == ["second"]
    older = await b.get_messages(ua.id, limit=10, offset_id=theirs[0].id)
    assert [m.message for m in older] == ["hello over localdc"]
    dialogs = await b.get_dialogs()
    d = next(d for d in dialogs if d.id == ua.id)
    assert d.unread_count == 2
    assert d.message.message == "second"


async def test_read_edit_delete_arrive_as_updates(
        localdc: LocalDC, clients: Callable[..., TelegramClient], wait_until: WaitUntil) -> None:
    a, b, ua, ub = await _pair(localdc, clients)
    read: list[Any] = []
    edits: list[Any] = []
    deletions: list[Any] = []
    a.add_event_handler(lambda e: read.append(e), events.MessageRead(inbox=False))
    b.add_event_handler(lambda e: edits.append(e.message), events.MessageEdited())
    b.add_event_handler(lambda e: deletions.append(e.deleted_ids), events.MessageDeleted())
    incoming: list[Any] = []
    b.add_event_handler(lambda e: incoming.append(e.message), events.NewMessage())
    sent = await a.send_message(ub.id, "typo")
    await wait_until(lambda: incoming, message="B receives the message")
    assert await b.send_read_acknowledge(ua.id, max_id=incoming[0].id)
    await wait_until(lambda: read, message="A sees its message read")
    assert read[0].max_id == sent.id
    assert read[0].outbox
    dialogs = await b.get_dialogs()
    assert next(d for d in dialogs if d.id == ua.id).unread_count == 0
    await a.edit_message(ub.id, sent.id, "fixed")
    await wait_until(lambda: edits, message="B sees the edit")
    assert edits[0].message == "fixed"
    assert edits[0].id == incoming[0].id
    assert (await b.get_messages(ua.id, limit=1))[0].message == "fixed"
    await a.delete_messages(ub.id, [sent.id], revoke=True)
    await wait_until(lambda: deletions, message="B sees the deletion")
    assert deletions[0] == [incoming[0].id]
    assert await b.get_messages(ua.id, limit=5) == []
    assert await a.get_messages(ub.id, limit=5) == []


async def test_unknown_peers_are_refused(localdc: LocalDC,
                                         clients: Callable[..., TelegramClient]) -> None:
    from telethon import errors

    a = clients(localdc)
    await login(a, localdc, PHONE_A)
    for request, error in (
        (functions.contacts.ResolveUsernameRequest("nobody_here"), errors.UsernameNotOccupiedError),
        (functions.contacts.ResolvePhoneRequest("99966000"), errors.RPCError),
        (functions.messages.SendMessageRequest(tl.InputPeerUser(42, 0), "x"),
         errors.PeerIdInvalidError),
    ):
        try:
            await a(request)
        except error:
            continue
        raise AssertionError(f"{type(request).__name__} was not refused")
