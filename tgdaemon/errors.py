"""Classify any failure into a category. Pure logic.

The worker never inspects exception types itself: ``classify`` turns Telethon RPC errors,
transport errors and socket errors into a :class:`Classified` value (category, stable code,
flood seconds, new DC, park state, redacted message).

``asyncio.CancelledError`` (and other non-``Exception`` ``BaseException``\\ s) are never
classified: ``classify`` raises ``TypeError``. Cancellation must propagate, not be retried.
What each category leads to is decided in :mod:`tgdaemon.lifecycle`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

from telethon import errors as te

from tgdaemon.lifecycle import Category, Classified, State
from tgdaemon.redact import redact

__all__ = ["Category", "Classified", "NotAuthorizedError", "classify"]

MAX_MESSAGE = 200


class NotAuthorizedError(Exception):
    """The server answered but the session is not logged in (getUsers returned no user)."""


# --------------------------------------------------------------------------- RPC error names


def _rpc_names() -> dict[type, str]:
    names: dict[type, str] = {}
    for pattern, cls in te.rpc_errors_re:
        names.setdefault(cls, re.sub(r"_?\(\\d\+\)", "", pattern))
    for key, cls in te.rpc_errors_dict.items():
        if key.isupper() or cls not in names:
            names[cls] = key.upper()
    return names


_RPC_NAMES = _rpc_names()
_BASE_RPC = frozenset({te.RPCError, *te.base_errors.values()})
_CAUSED_BY = re.compile(r"\(caused by ([\w()]+)\)$")
#: 400s that say the *connection* lost its initConnection (a server that restarted the session,
#: or keeps it per session), not that the request is wrong: a new connection, whose first
#: request carries initConnection, cures them, so they are retried like a server error.
#: (CONNECTION_LAYER_INVALID is not: a new connection sends the same layer.)
_CONNECTION_STATE = frozenset({"CONNECTION_NOT_INITED"})
_FS_ERRORS = (
    FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,
)


def _canonical(exc: te.RPCError) -> te.RPCError:
    """Base-class instances (unknown to Telethon's table, or built by hand with a message)
    are re-resolved by message, so ``UnauthorizedError(message="AUTH_KEY_UNREGISTERED")``
    classifies like ``AuthKeyUnregisteredError``."""
    if type(exc) not in _BASE_RPC or not isinstance(exc.message, str):
        return exc
    code = exc.code if exc.code is not None else type(exc).code
    resolved = te.rpc_message_to_error(
        _RpcErrorLike(code or 0, exc.message), getattr(exc, "request", None)
    )
    return resolved if type(resolved) not in _BASE_RPC else exc


@dataclass(frozen=True)
class _RpcErrorLike:
    error_code: int
    error_message: str


def _rpc_code(exc: te.RPCError) -> str:
    name = _RPC_NAMES.get(type(exc))
    if name:
        return name
    msg = exc.message if isinstance(exc.message, str) else ""
    token = re.sub(r"[^A-Za-z0-9]+", "_", msg).strip("_").upper()
    token = re.sub(r"\d+", "X", token)[:48]
    return token or f"RPC_{abs(_http_code(exc))}"


def _http_code(exc: te.RPCError) -> int:
    code = exc.code if exc.code is not None else type(exc).code
    return int(code or 0)


def _caused_by(exc: BaseException) -> str:
    m = _CAUSED_BY.search(str(exc))
    return f" (caused by {m[1]})" if m else ""


# --------------------------------------------------------------------------- classify


def classify(exc: BaseException) -> Classified:
    """Map any exception to a :class:`Classified`. Raises ``TypeError`` for cancellation and
    other non-``Exception`` base exceptions: those must propagate, never be retried."""
    if isinstance(exc, asyncio.CancelledError) or not isinstance(exc, Exception):
        raise TypeError(f"{type(exc).__name__} must propagate; it is not classified")
    if isinstance(exc, NotAuthorizedError):
        return Classified(Category.AUTH, "NOT_AUTHORIZED", str(exc),
                          park_state=State.NEEDS_LOGIN)
    if isinstance(exc, te.MultiError):
        inner = [classify(e) for e in exc.exceptions if isinstance(e, Exception)]
        if inner:
            return min(inner, key=lambda c: _SEVERITY.index(c.category))
        return _make(Category.UNKNOWN, "MultiError", exc)
    if isinstance(exc, te.RPCError):
        return _classify_rpc(_canonical(exc))
    return _classify_local(exc)


# MultiError reports its most consequential member.
_SEVERITY = (
    Category.AUTH, Category.FLOOD_WAIT, Category.MIGRATE, Category.SERVER, Category.NETWORK,
    Category.UNKNOWN, Category.CLIENT,
)


def _make(category: Category, code: str, exc: BaseException,
          park_state: State | None = None) -> Classified:
    text = str(exc).removesuffix(" (caused by NoneType)")
    message = f"{code}: {text}" if text and text != code else code
    return Classified(category, code, redact(message, MAX_MESSAGE), park_state=park_state)


def _classify_rpc(exc: te.RPCError) -> Classified:
    code = _rpc_code(exc)
    http = abs(_http_code(exc))
    seconds = getattr(exc, "seconds", None)
    if isinstance(exc, te.FloodError) and isinstance(seconds, int):
        return Classified(
            Category.FLOOD_WAIT, code, f"{code}: wait of {seconds} s required{_caused_by(exc)}",
            wait_seconds=seconds,
        )
    if isinstance(exc, te.AuthKeyDuplicatedError):
        return _make(Category.AUTH, code, exc, park_state=State.DUPLICATED)
    if isinstance(exc, te.UserDeactivatedError | te.UserDeactivatedBanError
                  | te.PhoneNumberBannedError):
        return _make(Category.AUTH, code, exc, park_state=State.BANNED)
    if isinstance(exc, te.UnauthorizedError):
        return _make(Category.AUTH, code, exc, park_state=State.NEEDS_LOGIN)
    if isinstance(exc, te.InvalidDCError):
        new_dc = getattr(exc, "new_dc", None)
        if isinstance(new_dc, int):
            return Classified(Category.MIGRATE, code, f"{code}: DC {new_dc}{_caused_by(exc)}",
                              new_dc=new_dc)
        return _make(Category.UNKNOWN, code, exc)
    if (isinstance(exc, te.ServerError | te.TimedOutError) or 500 <= http < 600
            or code in _CONNECTION_STATE):
        return _make(Category.SERVER, code, exc)
    if 400 <= http < 500:
        return _make(Category.CLIENT, code, exc)
    return _make(Category.UNKNOWN, code, exc)


def _classify_local(exc: Exception) -> Classified:
    name = type(exc).__name__
    if isinstance(exc, te.AuthKeyNotFound):
        return Classified(Category.AUTH, "AUTH_KEY_NOT_FOUND",
                          "AUTH_KEY_NOT_FOUND: the server does not know this auth key",
                          park_state=State.NEEDS_LOGIN)
    if isinstance(exc, te.InvalidBufferError):
        if exc.code == 404:
            return Classified(Category.AUTH, "AUTH_KEY_NOT_FOUND",
                              "AUTH_KEY_NOT_FOUND: transport error -404",
                              park_state=State.NEEDS_LOGIN)
        if exc.code == 429:
            return Classified(Category.NETWORK, "TRANSPORT_FLOOD",
                              "TRANSPORT_FLOOD: transport error -429 (too many connections)")
        return _make(Category.NETWORK, "INVALID_BUFFER", exc)
    if isinstance(exc, ValueError) and str(exc).startswith("Request was unsuccessful"):
        # Telethon gave up after its own retries of 500s / migrations.
        return _make(Category.SERVER, "REQUEST_UNSUCCESSFUL", exc)
    if isinstance(exc, _FS_ERRORS):
        return _make(Category.UNKNOWN, name, exc)
    if isinstance(exc, OSError | EOFError | te.InvalidChecksumError | te.ReadCancelledError
                  | te.BadMessageError):
        # ConnectionError (incl. "Cannot send requests while disconnected"), TimeoutError,
        # socket.gaierror, asyncio.IncompleteReadError, corrupted or cancelled transport reads.
        return _make(Category.NETWORK, name, exc)
    if type(exc).__module__.partition(".")[0] == "python_socks":
        return _make(Category.NETWORK, name, exc)
    return _make(Category.UNKNOWN, name, exc)
