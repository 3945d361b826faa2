"""The account's sessions through the API: list them, terminate one or all others.

What ``tgdaemon sessions`` calls while the daemon owns the account (a second client on the
same key would be AUTH_KEY_DUPLICATED). Sessions are described as the security watch sees
them (``tgdaemon.security``); the IP address only with ``security.log_ip``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from telethon import errors, functions

from tgdaemon.api.gateway import ApiError, Outcome
from tgdaemon.security import SessionInfo, session_from_tl

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from tgdaemon.telegram import ManagedClient

    Call = Callable[[ManagedClient], Awaitable[Any]]

__all__ = ["list_sessions", "session_json", "terminate_sessions"]


def session_json(s: SessionInfo, *, with_ip: bool) -> dict[str, Any]:
    """A session as the API shows it; the hash as a string (64-bit ids lose precision in JS)."""
    out: dict[str, Any] = {"hash": str(s.hash), "current": s.current, "device": s.device,
                           "platform": s.platform, "app": s.app, "country": s.country,
                           "created": int(s.created)}
    if with_ip:
        out["ip"] = s.ip
    return out


def list_sessions(with_ip: bool) -> Call:
    async def call(tc: ManagedClient) -> Any:
        listed = await tc(functions.account.GetAuthorizationsRequest())
        return {"sessions": [session_json(session_from_tl(a), with_ip=with_ip)
                             for a in listed.authorizations]}

    return call


def terminate_sessions(body: dict[str, Any]) -> Call:
    """``{"hash": "…"}`` ends one session, ``{"allOthers": true}`` every one but the daemon's
    (``body`` as the API's one body reader parsed and bounded it)."""
    all_others = body.get("allOthers") is True
    raw = body.get("hash")
    if all_others == (raw is not None):
        raise ApiError(Outcome.BAD_REQUEST, "give exactly one of hash or allOthers: true")
    reset: Any
    if all_others:
        reset = functions.auth.ResetAuthorizationsRequest()
    else:
        try:
            value = int(str(raw))
        except ValueError:
            raise ApiError(Outcome.BAD_REQUEST, "hash must be a session hash") from None
        if value == 0 or not -(2**63) <= value < 2**63:
            raise ApiError(Outcome.BAD_REQUEST, "hash must be another session's hash")
        reset = functions.account.ResetAuthorizationRequest(hash=value)

    async def call(tc: ManagedClient) -> Any:
        try:
            await tc(reset)
        except errors.FreshResetAuthorisationForbiddenError:
            # Telegram's rule, not a problem of this session: it must not read as "parked".
            raise ApiError(Outcome.FORBIDDEN, "Telegram refuses: this session is too new to "
                           "terminate others (about a day)",
                           rpc_error="FRESH_RESET_AUTHORISATION_FORBIDDEN") from None
        except errors.HashInvalidError:
            raise ApiError(Outcome.NOT_FOUND, "no such session",
                           rpc_error="HASH_INVALID") from None
        return {"ok": True}

    return call
