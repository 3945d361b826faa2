"""Account sessions on the local DC with stock Telethon clients: every sign-in is an
authorization, announced to the user's other sessions, listed and terminable as on Telegram."""

from __future__ import annotations

import asyncio

import pytest
from telethon import errors, events, functions, types

from tgdaemon.localdc.testing import login


async def test_sign_in_is_announced_and_listed(localdc, clients, phone, wait_until):
    first = clients(localdc, device_model="fleet-box", app_version="1.0")
    await login(first, localdc, phone)
    seen: list[types.UpdateNewAuthorization] = []

    async def on_new(update: types.UpdateNewAuthorization) -> None:
        seen.append(update)

    first.add_event_handler(on_new, events.Raw(types.UpdateNewAuthorization))
    await first.catch_up()
    intruder = clients(localdc, device_model="Evil Phone", app_version="6.6")
    await login(intruder, localdc, phone)
    await wait_until(lambda: len(seen) == 1, timeout=10)
    assert "Evil Phone" in (seen[0].device or "")
    assert seen[0].unconfirmed
    listed = await first(functions.account.GetAuthorizationsRequest())
    auths = listed.authorizations
    assert len(auths) == 2
    ours = [a for a in auths if a.current]
    assert len(ours) == 1
    assert ours[0].device_model == "fleet-box"
    assert ours[0].hash == 0
    other = next(a for a in auths if not a.current)
    assert other.device_model == "Evil Phone"
    assert other.app_version == "6.6"
    assert other.hash == seen[0].hash


async def test_reset_authorization_logs_the_other_session_out(localdc, clients, phone):
    first = clients(localdc)
    await login(first, localdc, phone)
    other = clients(localdc, device_model="other")
    await login(other, localdc, phone)
    listed = await first(functions.account.GetAuthorizationsRequest())
    target = next(a for a in listed.authorizations if not a.current)
    assert await first(functions.account.ResetAuthorizationRequest(hash=target.hash))
    with pytest.raises(errors.AuthKeyUnregisteredError):
        await other(functions.users.GetUsersRequest([types.InputUserSelf()]))
    assert (await first.get_me()).id == localdc.user_id(phone)
    listed = await first(functions.account.GetAuthorizationsRequest())
    assert [a.current for a in listed.authorizations] == [True]
    with pytest.raises(errors.HashInvalidError):
        await first(functions.account.ResetAuthorizationRequest(hash=target.hash))


async def test_reset_all_others_and_fresh_session_refusal(localdc, clients, phone):
    old = clients(localdc)
    await login(old, localdc, phone)
    others = [clients(localdc, device_model=f"d{i}") for i in range(2)]
    for c in others:
        await login(c, localdc, phone)
    localdc.world.fresh_reset_after = 3600
    with pytest.raises(errors.FreshResetAuthorisationForbiddenError):
        await old(functions.auth.ResetAuthorizationsRequest())
    localdc.world.fresh_reset_after = 0
    assert await old(functions.auth.ResetAuthorizationsRequest())
    for c in others:
        with pytest.raises(errors.AuthKeyUnregisteredError):
            await c(functions.updates.GetStateRequest())
    assert await old(functions.updates.GetStateRequest())


async def test_a_login_carried_to_another_dc_is_one_authorization(tmp_path, clients, phone):
    from tgdaemon.localdc import LocalDC

    async with LocalDC(tmp_path / "dc", dcs=2) as dc:
        client = clients(dc)
        await login(client, dc, phone)
        await client._switch_dc(2)  # stock Telethon: a fresh, unauthorised key on DC 2
        await asyncio.wait_for(client.connect(), 10)
        # The daemon's way: export from DC 1 with a DC-1 client, import on DC 2.
        home = clients(dc)
        await login(home, dc, phone)
        exported = await home(functions.auth.ExportAuthorizationRequest(dc_id=2))
        await client(functions.auth.ImportAuthorizationRequest(id=exported.id,
                                                               bytes=exported.bytes))
        listed = await client(functions.account.GetAuthorizationsRequest())
        # Two sign-ins on DC 1 (client's first login, home); the DC 2 key carries home's.
        assert len(listed.authorizations) == 2
        assert sum(a.current for a in listed.authorizations) == 1


async def test_qr_login_token_accepted_by_a_logged_in_session(localdc, clients, phone,
                                                               wait_until):
    """Telethon's own QR login: a new key exports a token, an existing session accepts it,
    the new key is pushed updateLoginToken and logs in; the new login is announced."""
    old = clients(localdc)
    user = await login(old, localdc, phone)
    seen: list[types.UpdateNewAuthorization] = []

    async def on_new(update: types.UpdateNewAuthorization) -> None:
        seen.append(update)

    old.add_event_handler(on_new, events.Raw(types.UpdateNewAuthorization))
    new = clients(localdc, device_model="rotated")
    await new.connect()
    qr = await new.qr_login()
    waiter = asyncio.create_task(qr.wait(10))
    accepted = await old(functions.auth.AcceptLoginTokenRequest(token=qr.token))
    assert isinstance(accepted, types.Authorization)
    me = await waiter
    assert me.id == user.id
    assert (await new.get_me()).id == user.id
    listed = await old(functions.account.GetAuthorizationsRequest())
    assert len(listed.authorizations) == 2
    await wait_until(lambda: len(seen) == 1, 5, "the new login announced to the old session")
    with pytest.raises(errors.AuthTokenInvalidError):  # a used token is gone
        await old(functions.auth.AcceptLoginTokenRequest(token=qr.token))
    # the old key can now be logged out without losing the account
    await old.log_out()
    assert (await new.get_me()).id == user.id


async def test_login_token_with_2fa_and_unknown_tokens(localdc, clients, phone):
    localdc.set_password(phone, "pw")
    old = clients(localdc)
    await login(old, localdc, phone, password="pw")
    new = clients(localdc)
    await new.connect()
    first = await new(functions.auth.ExportLoginTokenRequest(
        api_id=new.api_id, api_hash=new.api_hash, except_ids=[]))
    await old(functions.auth.AcceptLoginTokenRequest(token=first.token))
    with pytest.raises(errors.SessionPasswordNeededError):
        await new(functions.auth.ExportLoginTokenRequest(
            api_id=new.api_id, api_hash=new.api_hash, except_ids=[]))
    me = await new.sign_in(password="pw")
    assert me.id == localdc.user_id(phone)
    with pytest.raises(errors.AuthTokenInvalidError):
        await old(functions.auth.AcceptLoginTokenRequest(token=b"x" * 32))
