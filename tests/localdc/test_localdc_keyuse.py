"""AUTH_KEY_DUPLICATED, as Telegram answers it: one auth key used by two connections with
different session ids at the same time invalidates the key for both clients."""

from __future__ import annotations

import pytest
from telethon import errors
from telethon.sessions import StringSession
from telethon.tl import functions, types

from tgdaemon.localdc.keyuse import KeyUse
from tgdaemon.localdc.testing import login

GET_SELF = functions.users.GetUsersRequest([types.InputUserSelf()])


def test_key_use_rules() -> None:
    use = KeyUse()
    a, b, c = object(), object(), object()
    assert not use.session(a, 7, 100)
    assert not use.session(a, 7, 101)  # one connection changing its session id: fine
    use.attach(b, 7)
    assert use.live(7) == 2
    assert not use.session(b, 7, 101)  # same session id on two connections: not a duplicate
    assert not use.session(c, 8, 555)  # another key
    assert use.session(b, 7, 202)  # a different session at the same time: duplicated
    assert use.duplicated == {7}
    use.detach(a, 7)
    use.detach(b, 7)
    assert use.live(7) == 0
    assert use.peak(7) == 2
    assert use.session(a, 7, 300)  # invalidated for good, like Telegram's key
    assert not use.session(a, 9, 1)


async def test_two_clients_on_one_key_get_auth_key_duplicated(localdc, clients, phone):
    first = clients(localdc)
    user = await login(first, localdc, phone)
    text = StringSession.save(first.session)
    await first(GET_SELF)  # works alone

    second = clients(localdc, session=StringSession(text))
    # connect()'s initConnection(help.getConfig) is the first request under the key
    with pytest.raises(errors.AuthKeyDuplicatedError):
        await second.connect()
    with pytest.raises(errors.AuthKeyDuplicatedError):
        await first(GET_SELF)
    assert localdc.counters(user_id=user.id)["auth_key_duplicated"] >= 2

    # One client after the other (the first disconnected first) is no duplicate.
    other = clients(localdc)
    await login(other, localdc, "+999 66 1000002")
    third_text = StringSession.save(other.session)
    await other.disconnect()
    again = clients(localdc, session=StringSession(third_text))
    await again.connect()
    assert await again.is_user_authorized()
