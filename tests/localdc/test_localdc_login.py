"""Key exchange, login and get_me with a stock TelegramClient over real TCP."""

from __future__ import annotations

from telethon.sessions import StringSession

from tgdaemon.localdc.testing import login


async def test_fresh_key_exchange_and_get_me(localdc, clients, phone):
    client = clients(localdc, session=StringSession())
    await client.connect()
    assert localdc.counters(dc_id=1)["key_exchanges"] == 1
    assert await client.get_me() is None  # not logged in yet
    assert not await client.is_user_authorized()
    user = await login(client, localdc, phone)
    me = await client.get_me()
    assert me.id == user.id == localdc.user_id(phone)
    assert me.is_self
    reqs = localdc.counters(dc_id=1)["requests"]
    assert reqs["auth.sendCode"] == 1
    assert reqs["auth.signIn"] == 1
    assert reqs["help.getConfig"] == 1
