"""Key exchange, login and get_me with a stock TelegramClient over real TCP."""

from __future__ import annotations

import pytest
from telethon import errors, events, functions
from telethon.sessions import StringSession

from tgdaemon.localdc import LocalDC
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


async def test_login_with_2fa_password(localdc, clients, phone):
    localdc.set_password(phone, "correct horse")
    client = clients(localdc)
    user = await login(client, localdc, phone, password="correct horse")
    assert (await client.get_me()).id == user.id
    reqs = localdc.counters()["requests"]
    assert reqs["account.getPassword"] == 1
    assert reqs["auth.checkPassword"] == 1


async def test_wrong_code_is_rejected(localdc, clients, phone):
    client = clients(localdc)
    await client.connect()
    await client.send_code_request(phone)
    with pytest.raises(errors.PhoneCodeInvalidError):
        await client.sign_in(phone, "99999")
    assert localdc.user_id(phone) is None
    await client.sign_in(phone, localdc.last_code(phone))
    assert await client.is_user_authorized()


async def test_wrong_password_is_rejected(localdc, clients, phone):
    localdc.set_password(phone, "right")
    client = clients(localdc)
    await client.connect()
    await client.send_code_request(phone)
    with pytest.raises(errors.SessionPasswordNeededError):
        await client.sign_in(phone, localdc.last_code(phone))
    with pytest.raises(errors.PasswordHashInvalidError):
        await client.sign_in(password="wrong")
    assert localdc.user_id(phone) is None
    me = await client.sign_in(password="right")
    assert me.id == localdc.user_id(phone)


async def test_random_code_is_readable(tmp_path, isolated_telethon, clients, phone):
    async with LocalDC(tmp_path / "dc", code=None) as dc:
        client = clients(dc)
        await client.connect()
        await client.send_code_request(phone)
        code = dc.last_code(phone)
        assert code is not None
        assert len(code) == 5
        await client.sign_in(phone, code)
        assert (await client.get_me()).id == dc.user_id(phone)
        await client.disconnect()


async def test_session_survives_localdc_restart(tmp_path, isolated_telethon, clients, phone):
    state = tmp_path / "dc"
    async with LocalDC(state) as dc:
        client = clients(dc, session=StringSession())
        user = await login(client, dc, phone)
        saved = client.session.save()
        port = dc.addresses[1][1]
        await client.disconnect()
    async with LocalDC(state, port=port) as dc2:
        client2 = clients(dc2, session=saved)
        await client2.connect()
        me = await client2.get_me()
        assert me.id == user.id
        assert dc2.counters()["key_exchanges"] == 0
        await client2.disconnect()


async def test_send_message_to_self_reaches_other_session(localdc, clients, phone,
                                                           wait_until):
    a = clients(localdc)
    b = clients(localdc)
    await login(a, localdc, phone)
    await login(b, localdc, phone)
    got: list[str] = []
    b.add_event_handler(lambda ev: got.append(ev.raw_text), events.NewMessage())
    sent = await a.send_message("me", "note to self")
    assert sent.id > 0
    await wait_until(lambda: got == ["note to self"])


async def test_pushed_update_reaches_event_handler(localdc, clients, phone, wait_until):
    client = clients(localdc)
    user = await login(client, localdc, phone)
    got: list[tuple[str, int]] = []
    client.add_event_handler(lambda ev: got.append((ev.raw_text, ev.sender_id)),
                             events.NewMessage(incoming=True))
    localdc.push_update(user.id, "hello from localdc")
    await wait_until(lambda: got == [("hello from localdc", 777000)])


async def test_export_import_authorization(localdc, clients, phone):
    a = clients(localdc, 1)
    user = await login(a, localdc, phone)
    exported = await a(functions.auth.ExportAuthorizationRequest(dc_id=2))
    b = clients(localdc, 2)
    await b.connect()
    auth = await b(functions.auth.ImportAuthorizationRequest(id=exported.id,
                                                             bytes=exported.bytes))
    assert auth.user.id == user.id
    assert (await b.get_me()).id == user.id
    with pytest.raises(errors.AuthBytesInvalidError):  # single use
        await b(functions.auth.ImportAuthorizationRequest(id=exported.id,
                                                          bytes=exported.bytes))


async def test_log_out_unbinds_key(localdc, clients, phone):
    client = clients(localdc)
    await login(client, localdc, phone)
    key_ids = localdc.auth_key_ids(user_id=localdc.user_id(phone))
    assert len(key_ids) == 1
    assert await client.log_out()
    assert localdc.auth_key_ids(user_id=localdc.user_id(phone)) == []
