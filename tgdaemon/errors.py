"""Classify any failure into a category, and map a category to a recovery. Pure logic.

The worker never inspects exception types itself: ``classify`` turns Telethon RPC errors,
transport errors and socket errors into a :class:`Classified` value (category, stable code,
flood seconds, new DC, park state, redacted message) and ``recovery_for`` decides what to do.

Rules worth knowing:

* ``asyncio.CancelledError`` (and other non-``Exception`` ``BaseException``\\ s) are never
  classified: ``classify`` raises ``TypeError``. Cancellation must propagate, not be retried.
* ``attempt`` in :func:`recovery_for` is 0-based: the number of earlier consecutive failures of
  the same category. A per-category retry limit ``L`` (``[policy.retry_limits]``, 0 = unlimited)
  is the number of consecutive failures tolerated: the ``L``-th one gives ``"fail"``. So
  ``client = 1`` means a 400-class error is never retried.
* FLOOD_WAIT always gives ``"wait"`` for at least the server's seconds. When the wait is longer
  than ``policy.flood_sleep_max`` the recovery carries ``park_state="flood_wait"``: the account
  is shown parked in state flood_wait until the deadline, then retried like any other wait.
* AUTH never retries: ``"park"`` with ``needs_login``, ``banned`` or ``duplicated``; the
  encrypted session is kept for inspection (the worker must not delete it).
* MIGRATE (USER/PHONE/NETWORK_MIGRATE_X) gives ``"migrate"`` to ``new_dc``; the caller persists
  the DC at once. FILE/STATS_MIGRATE concern one request, not the account's home DC: ``"fail"``.
  More than :data:`MAX_MIGRATIONS` consecutive migrations is a loop: ``"fail"``.
"""

from __future__ import annotations

import asyncio
import random
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from telethon import errors as te

from tgdaemon.retry import backoff_delay, flood_wait_delay

if TYPE_CHECKING:
    from tgdaemon.config import PolicyConfig

__all__ = [
    "MAX_MIGRATIONS",
    "Category",
    "Classified",
    "Recovery",
    "classify",
    "recovery_for",
    "redact",
]

MAX_MIGRATIONS = 5
MAX_MESSAGE = 200
HOME_MIGRATE_CODES = frozenset({"USER_MIGRATE", "PHONE_MIGRATE", "NETWORK_MIGRATE"})


class Category(StrEnum):
    NETWORK = "network"
    FLOOD_WAIT = "flood_wait"
    AUTH = "auth"
    SERVER = "server"
    MIGRATE = "migrate"
    CLIENT = "client"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class Classified:
    category: Category
    code: str  # stable short reason: "FLOOD_WAIT", "AUTH_KEY_UNREGISTERED", "TimeoutError", ...
    message: str  # redacted: safe to log and to show in /status
    wait_seconds: int | None = None  # FLOOD_WAIT
    new_dc: int | None = None  # MIGRATE
    park_state: str | None = None  # AUTH: "needs_login" | "banned" | "duplicated"


@dataclass(frozen=True)
class Recovery:
    action: Literal["retry", "wait", "park", "migrate", "fail"]
    delay: float | None = None  # seconds to sleep before the next attempt (retry, wait)
    park_state: str | None = None  # park: the state; wait: "flood_wait" if beyond the sleep max
    new_dc: int | None = None  # migrate
    reason: str = ""  # short, safe: why this action


# --------------------------------------------------------------------------- redaction

_PLUS_PHONE = re.compile(r"\+\d[\d\s().-]{5,}\d")
_LOOSE_PHONE = re.compile(r"\d[\d\s()-]{6,}\d")
_HEX = re.compile(r"\b[0-9a-fA-F]{17,}\b")
_B64ISH = re.compile(r"[A-Za-z0-9+/=_-]{17,}")
_DIGITS = re.compile(r"\d{5,}")


def redact(text: str) -> str:
    """Remove what might be a secret or personal data: phone numbers, digit runs of 5 or more
    (login codes, ids; ports of 5 digits go too), hex and base64-looking blobs over 16 chars
    (keys, session strings). Error names and class names survive."""
    text = _HEX.sub("<hex>", text)
    text = _B64ISH.sub(lambda m: "<blob>" if _looks_random(m[0]) else m[0], text)
    text = _PLUS_PHONE.sub("<phone>", text)
    text = _LOOSE_PHONE.sub(
        lambda m: "<phone>" if sum(c.isdigit() for c in m[0]) >= 7 else m[0], text
    )
    text = _DIGITS.sub("<num>", text)
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _looks_random(token: str) -> bool:
    # base64 of random bytes mixes digits with both cases; identifiers rarely do all three.
    return (
        any(c.isdigit() for c in token)
        and any(c.islower() for c in token)
        and any(c.isupper() for c in token)
    )


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


def _make(category: Category, code: str, exc: BaseException, **kw: object) -> Classified:
    text = redact(str(exc).removesuffix(" (caused by NoneType)"))
    message = f"{code}: {text}" if text and text != code else code
    return Classified(category, code, message, **kw)  # type: ignore[arg-type]


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
        return _make(Category.AUTH, code, exc, park_state="duplicated")
    if isinstance(exc, te.UserDeactivatedError | te.UserDeactivatedBanError
                  | te.PhoneNumberBannedError):
        return _make(Category.AUTH, code, exc, park_state="banned")
    if isinstance(exc, te.UnauthorizedError):
        return _make(Category.AUTH, code, exc, park_state="needs_login")
    if isinstance(exc, te.InvalidDCError):
        new_dc = getattr(exc, "new_dc", None)
        if isinstance(new_dc, int):
            return Classified(Category.MIGRATE, code, f"{code}: DC {new_dc}{_caused_by(exc)}",
                              new_dc=new_dc)
        return _make(Category.UNKNOWN, code, exc)
    if isinstance(exc, te.ServerError | te.TimedOutError) or 500 <= http < 600:
        return _make(Category.SERVER, code, exc)
    if 400 <= http < 500:
        return _make(Category.CLIENT, code, exc)
    return _make(Category.UNKNOWN, code, exc)


def _classify_local(exc: Exception) -> Classified:
    name = type(exc).__name__
    if isinstance(exc, te.AuthKeyNotFound):
        return Classified(Category.AUTH, "AUTH_KEY_NOT_FOUND",
                          "AUTH_KEY_NOT_FOUND: the server does not know this auth key",
                          park_state="needs_login")
    if isinstance(exc, te.InvalidBufferError):
        if exc.code == 404:
            return Classified(Category.AUTH, "AUTH_KEY_NOT_FOUND",
                              "AUTH_KEY_NOT_FOUND: transport error -404", park_state="needs_login")
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


# --------------------------------------------------------------------------- recovery


def recovery_for(
    c: Classified, attempt: int, policy: PolicyConfig, rng: random.Random
) -> Recovery:
    """What to do about ``c``, the failure after ``attempt`` earlier consecutive ones of the
    same category (0-based). Pure: the delay comes from ``rng``, never from a clock."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if c.category is Category.AUTH:
        return Recovery("park", park_state=c.park_state or "needs_login", reason=c.code)
    if c.category is Category.MIGRATE:
        if c.new_dc is None or c.code not in HOME_MIGRATE_CODES:
            return Recovery("fail", reason=f"{c.code}: not a home DC migration")
        if attempt >= MAX_MIGRATIONS:
            return Recovery("fail", reason=f"{c.code}: {attempt} migrations in a row")
        return Recovery("migrate", new_dc=c.new_dc, reason=f"{c.code} to DC {c.new_dc}")
    limit = policy.retry_limits.for_category(c.category.value)
    if limit and attempt + 1 >= limit:
        return Recovery("fail", reason=f"{c.category.value} retry limit {limit} reached")
    if c.category is Category.FLOOD_WAIT:
        seconds = c.wait_seconds or 0
        return Recovery(
            "wait",
            delay=flood_wait_delay(seconds, rng),
            park_state="flood_wait" if seconds > policy.flood_sleep_max else None,
            reason=f"{c.code} {seconds}s",
        )
    delay = backoff_delay(
        attempt, base=policy.backoff_base, cap=policy.backoff_cap,
        jitter=policy.backoff_jitter, rng=rng,
    )
    return Recovery("retry", delay=delay, reason=c.code)
