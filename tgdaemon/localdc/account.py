"""The local DC's account sessions: listing and terminating a user's authorizations, and
logging a new key in through a login token that an existing session accepts.

One authorization per sign-in (see ``World.authorize``): ``account.getAuthorizations`` lists
them with what each app said in initConnection, ``account.resetAuthorization`` and
``auth.resetAuthorizations`` log them out, refused with FRESH_RESET_AUTHORISATION_FORBIDDEN
while the caller's own login is younger than ``World.fresh_reset_after``, as Telegram does.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime

from telethon.tl import functions as fn
from telethon.tl import types as tl
from telethon.tl.types import account as tl_account
from telethon.tl.types import auth as tl_auth

from tgdaemon.localdc.rpc import Ctx, LoginTokenState, RpcFail, World, _handles, boolean
from tgdaemon.localdc.store import ClientRecord

#: What Telegram reports as authorization_ttl_days by default.
AUTHORIZATION_TTL_DAYS = 180
#: Lifetime of an exported login token (Telegram's are valid for about 30 s).
LOGIN_TOKEN_TTL = 30


def logins(w: World, user_id: int) -> dict[int, list[ClientRecord]]:
    """The user's authorizations: hash -> the clients (one per DC key) sharing that login."""
    found: dict[int, list[ClientRecord]] = {}
    for key_id, rec in w.store.auth_keys.items():
        client = w.store.clients.get(key_id)
        if rec.user_id == user_id and client is not None and client.auth_hash is not None:
            found.setdefault(client.auth_hash, []).append(client)
    return found


def _when(ts: int | None) -> datetime:
    return datetime.fromtimestamp(ts or 0, UTC)


def _authorization(auth_hash: int, clients: list[ClientRecord], current: int | None
                   ) -> tl.Authorization:
    first = min(clients, key=lambda c: c.authorized_at or 0)
    is_current = auth_hash == current
    return tl.Authorization(
        hash=0 if is_current else auth_hash, current=is_current,
        device_model=first.device_model, platform="", system_version=first.system_version,
        api_id=first.api_id, app_name="", app_version=first.app_version,
        date_created=_when(first.authorized_at), date_active=_when(first.authorized_at),
        ip="127.0.0.1", country="ZZ", region="",
    )


def _fresh_check(w: World, ctx: Ctx) -> None:
    client = w.store.clients.get(ctx.key_id)
    since = client.authorized_at if client and client.authorized_at else 0
    if w.fresh_reset_after and time.time() - since < w.fresh_reset_after:
        raise RpcFail(406, "FRESH_RESET_AUTHORISATION_FORBIDDEN")


def _terminate(w: World, clients: list[ClientRecord]) -> None:
    for client in clients:
        w.end_authorization(client.key_id)


@_handles(fn.account.GetAuthorizationsRequest)
def _get_authorizations(w: World, ctx: Ctx, req: object) -> tl_account.Authorizations:
    me = w.user(ctx)
    current = w.auth_hash(ctx.key_id)
    found = logins(w, me.id)
    items = [_authorization(h, cs, current) for h, cs in found.items()]
    items.sort(key=lambda a: (not a.current, -(a.date_created or _when(0)).timestamp()))
    return tl_account.Authorizations(authorization_ttl_days=AUTHORIZATION_TTL_DAYS,
                                     authorizations=items)


@_handles(fn.account.ResetAuthorizationRequest)
def _reset_authorization(w: World, ctx: Ctx, req: fn.account.ResetAuthorizationRequest
                         ) -> bytes:
    me = w.user(ctx)
    current = w.auth_hash(ctx.key_id)
    found = logins(w, me.id)
    if req.hash == 0 or req.hash == current or req.hash not in found:
        raise RpcFail(400, "HASH_INVALID")
    _fresh_check(w, ctx)
    _terminate(w, found[req.hash])
    return boolean(True)


@_handles(fn.auth.ResetAuthorizationsRequest)
def _reset_authorizations(w: World, ctx: Ctx, req: object) -> bytes:
    me = w.user(ctx)
    current = w.auth_hash(ctx.key_id)
    _fresh_check(w, ctx)
    for auth_hash, clients in logins(w, me.id).items():
        if auth_hash != current:
            _terminate(w, clients)
    return boolean(True)


# -- login tokens (QR login; a new auth key authorised by an existing session) ----------------


@_handles(fn.auth.ExportLoginTokenRequest)
def _export_login_token(w: World, ctx: Ctx, req: fn.auth.ExportLoginTokenRequest
                        ) -> tl_auth.LoginToken | tl_auth.LoginTokenSuccess:
    """First call: a token for another session to accept. Once accepted, the next call logs
    this key in (or asks for the 2FA password, as a code sign-in would)."""
    now = time.time()
    for token, state in list(w.login_tokens.items()):
        if state.expires < now:
            del w.login_tokens[token]
        elif state.key_id == ctx.key_id and state.user_id is not None:
            del w.login_tokens[token]
            rec = w.store.users[state.user_id]
            if rec.phone in w.store.passwords:
                w.pending_2fa[ctx.key_id] = rec.phone
                raise RpcFail(401, "SESSION_PASSWORD_NEEDED")
            return tl_auth.LoginTokenSuccess(authorization=w.authorize(ctx, rec))
    token = os.urandom(32)
    w.login_tokens[token] = LoginTokenState(ctx.key_id, ctx.dc_id, now + LOGIN_TOKEN_TTL)
    return tl_auth.LoginToken(expires=_when(int(now + LOGIN_TOKEN_TTL)), token=token)


@_handles(fn.auth.AcceptLoginTokenRequest)
def _accept_login_token(w: World, ctx: Ctx, req: fn.auth.AcceptLoginTokenRequest
                        ) -> tl.Authorization:
    me = w.user(ctx)
    state = w.login_tokens.get(req.token)
    if state is None:
        raise RpcFail(400, "AUTH_TOKEN_INVALID")
    if state.expires < time.time():
        del w.login_tokens[req.token]
        raise RpcFail(400, "AUTH_TOKEN_EXPIRED")
    if state.user_id is not None:
        raise RpcFail(400, "AUTH_TOKEN_ALREADY_ACCEPTED")
    state.user_id = me.id
    if w.push_key is not None:
        w.push_key(state.key_id, tl.UpdateShort(update=tl.UpdateLoginToken(),
                                                date=_when(int(time.time()))))
    client = w.store.clients.get(state.key_id) or ClientRecord(state.key_id, 0, "", "", "")
    return _authorization(0, [client], None)
