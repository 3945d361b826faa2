"""A new auth key for a logged-in account, without a login code (``tgdaemon rotate-session``).

Telegram's login-token flow (the one behind QR login): a client on a fresh key exports a token,
the account's current session accepts it, the fresh key exports again and is logged in (or asks
for the 2FA password). The caller then makes the new key durable and only after that logs the
old key out, so a crash at any step leaves the account with one working key: before the write
the stored key is the old one, still valid; after it the new one, already valid.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from telethon import errors, functions, types
from telethon.crypto import AuthKey
from telethon.sessions import MemorySession

from tgdaemon.exceptions import AccountError

if TYPE_CHECKING:
    from tgdaemon.store import SessionData

T = TypeVar("T")
#: ``tgdaemon.oneshot.call``'s shape: (what, coroutine factory, retry=..., expected=...) -> T.
Call = Callable[..., Awaitable[Any]]

__all__ = ["authorize_new_key", "memory_session"]

#: Password tries before giving up, as ``tgdaemon login`` does.
PASSWORD_TRIES = 3


def memory_session(data: SessionData, *, with_key: bool) -> MemorySession:
    """A Telethon session on ``data``'s DC that writes nothing to the store: the rotation
    decides itself what becomes durable, and when."""
    session = MemorySession()
    session.set_dc(data.dc_id, data.server_address, data.port)
    if with_key and data.auth_key is not None:
        session.auth_key = AuthKey(data.auth_key)
    return session


async def authorize_new_key(
    current: Any,
    fresh: Any,
    *,
    api_id: int,
    api_hash: str,
    password: Callable[[], str],
    call: Call,
) -> types.User:
    """Log ``fresh`` (connected, on a new key, same DC) in as ``current``'s user.

    Neither acceptance nor the second export is retried: a token is good once."""
    export = functools.partial(fresh, functions.auth.ExportLoginTokenRequest(
        api_id=api_id, api_hash=api_hash, except_ids=[]))
    token = await call("auth.exportLoginToken", export)
    if not isinstance(token, types.auth.LoginToken):
        raise AccountError(f"unexpected answer to auth.exportLoginToken: "
                           f"{type(token).__name__}")
    await call("auth.acceptLoginToken", functools.partial(
        current, functions.auth.AcceptLoginTokenRequest(token=token.token)), retry=False)
    try:
        result = await call("auth.exportLoginToken", export, retry=False,
                            expected=(errors.SessionPasswordNeededError,))
    except errors.SessionPasswordNeededError:
        for _ in range(PASSWORD_TRIES):
            try:
                user = await call("auth.checkPassword",
                                  functools.partial(fresh.sign_in, password=password()),
                                  retry=False, expected=(errors.PasswordHashInvalidError,))
                break
            except errors.PasswordHashInvalidError:
                continue
        else:
            raise AccountError("2FA password rejected three times") from None
    else:
        if isinstance(result, types.auth.LoginTokenMigrateTo):
            # Only when the current session lives on another DC than the one we connected
            # the fresh key to; the caller connects both to the stored DC, so this is a bug.
            raise AccountError(f"the new key was sent to DC {result.dc_id}; not supported")
        if not isinstance(result, types.auth.LoginTokenSuccess):
            raise AccountError(f"the login token was not accepted ({type(result).__name__})")
        user = result.authorization.user
    if not isinstance(user, types.User):
        raise AccountError("the new key did not log in")
    return user
