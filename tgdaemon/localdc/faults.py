"""Fault injection for the local DC: what to break, for whom, and how often.

Pure logic (no I/O) so the matching rules can be tested without sockets. The server asks a
:class:`FaultBook` at well-defined points (accept, each request, each reply, each pushed update).

Method names: a fault's ``method`` matches a request by any of three spellings, exactly:
the TL name (``"users.getUsers"``, ``"ping"``, ``"req_DH_params"``), the Telethon class name
(``"GetUsersRequest"``) or the namespaced class name (``"users.GetUsersRequest"``).
``"*"`` matches every RPC method except pings; ``None`` matches everything, pings and the
key-exchange steps included (the natural choice for ``stall`` and ``latency``).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Literal

FaultKind = Literal["refuse", "stall", "latency", "rpc_error", "mute_updates", "clock_skew",
                    "salt_change", "new_session", "bundle", "gzip", "bad_msg",
                    "transport_error"]
KINDS: frozenset[str] = frozenset(
    ("refuse", "stall", "latency", "rpc_error", "mute_updates", "clock_skew",
     "salt_change", "new_session", "bundle", "gzip", "bad_msg", "transport_error")
)
#: Kinds that make localdc behave as Telegram may, where it is otherwise simpler: the
#: MTProto service messages and packings a real server sends that a client must handle.
#: ``code`` is the bad_msg_notification error code (``bad_msg``) or the transport error
#: (``transport_error``: 404, 429, 444).
NEEDS_CODE = frozenset(("bad_msg", "transport_error"))

#: Methods that ``"*"`` does not match: keepalive must survive an rpc_error fault on "*".
PING_METHODS = frozenset(("ping", "ping_delay_disconnect"))
#: Pseudo-method of service messages (new_session_created, bad_server_salt): only ``None``.
SERVICE_METHOD = "msg_service"
_NOT_STAR = PING_METHODS | {SERVICE_METHOD}

_ERROR_CODES: tuple[tuple[str, int], ...] = (
    (r"FLOOD_WAIT_\d+|FLOOD_PREMIUM_WAIT_\d+|SLOWMODE_WAIT_\d+", 420),
    (r"(USER|PHONE|NETWORK|FILE|STATS)_MIGRATE_\d+", 303),
    (r"AUTH_KEY_UNREGISTERED|AUTH_KEY_INVALID|SESSION_REVOKED|SESSION_EXPIRED"
     r"|USER_DEACTIVATED|USER_DEACTIVATED_BAN|SESSION_PASSWORD_NEEDED", 401),
    (r"AUTH_KEY_DUPLICATED", 406),
    (r"RPC_CALL_FAIL|INTERNAL|RPC_MCGET_FAIL|INTERDC_\w+|NO_WORKERS_RUNNING|TIMEOUT", 500),
)


def flood_wait_seconds(message: str) -> int:
    """N of ``FLOOD_WAIT_N``/``FLOOD_PREMIUM_WAIT_N`` (0 for any other error)."""
    m = re.fullmatch(r"FLOOD_(?:PREMIUM_)?WAIT_(\d+)", message)
    return int(m[1]) if m else 0


def error_code_for(message: str) -> int:
    """Telegram's numeric code for an error message (400 when unknown)."""
    for pattern, code in _ERROR_CODES:
        if re.fullmatch(pattern, message):
            return code
    return 400


@dataclass(frozen=True)
class Fault:
    """One injected fault.

    Scope: ``dc_id``, ``user_id`` and ``auth_key_id`` narrow it (``None`` = any); a fault
    scoped to a user or key applies to a connection only once its key is known.
    ``times``: how many matches it fires for (``1`` = once); ``None`` = until cleared.

    Kinds:
      * ``refuse``: abort new TCP connections (RST right after accept).
      * ``stall``: accept, read, never answer the matching messages (``method=None`` =
        everything, including mid key exchange, e.g. ``method="req_DH_params"``).
      * ``latency``: delay the answer to matching messages by ``seconds``.
      * ``rpc_error``: answer matching requests with ``error`` (``"FLOOD_WAIT_7"``,
        ``"USER_MIGRATE_2"``…); ``code`` defaults from the message (420, 303, 401, 406, 500…).
      * ``mute_updates``: pushed updates are silently not delivered; pings still answered.
      * ``clock_skew``: server msg_ids are shifted by ``seconds`` (may be negative).

    Real-server behaviours (core.telegram.org/mtproto/service_messages and
    /mtproto/mtproto-transports), per matching packet or request:
      * ``salt_change``: the connection's server salt changes first, so the packet is
        answered with ``bad_server_salt`` (a salt expiring mid-session); ``method`` ignored.
      * ``new_session``: the server forgets the session first: ``new_session_created``
        before the packet is served (a server restarted mid-connection); ``method`` ignored.
      * ``bundle``: the answer goes in a ``msg_container`` with a ``msgs_ack`` of the request.
      * ``gzip``: the result is ``gzip_packed`` inside its ``rpc_result``; a pushed update
        (``method=None``) travels as a top-level ``gzip_packed``.
      * ``bad_msg``: the request is answered with ``bad_msg_notification`` of error ``code``
        (16/17 msg_id too low/high, 32/33 seqno too low/high, 64 invalid container...)
        instead of being served.
      * ``transport_error``: the packet is answered with transport error ``-code`` (404, 429,
        444) and the connection closed; ``method`` ignored.
    """

    kind: FaultKind
    dc_id: int | None = None
    user_id: int | None = None
    auth_key_id: int | None = None
    method: str | None = "*"
    error: str | None = None
    code: int | None = None
    times: int | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "rpc_error" and not self.error:
            raise ValueError("an rpc_error fault needs an error message")
        if self.kind in NEEDS_CODE and self.code is None:
            raise ValueError(f"a {self.kind} fault needs a code")
        if self.times is not None and self.times < 1:
            raise ValueError("times must be >= 1 or None")

    @property
    def error_code(self) -> int:
        if self.code is not None:
            return self.code
        return error_code_for(self.error or "")

    def to_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Fault:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fault fields: {sorted(unknown)}")
        # The field names are checked above; their values are checked by __post_init__.
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class MethodNames:
    """The spellings of one request method, as used for matching and counters."""

    tl: str
    cls: str
    qualified: str

    def matches(self, pattern: str | None) -> bool:
        if pattern is None:
            return True
        if pattern == "*":
            return self.tl not in _NOT_STAR
        return pattern in (self.tl, self.cls, self.qualified)


@dataclass(frozen=True)
class Scope:
    """Who a message belongs to, as far as the server knows at that point."""

    dc_id: int
    user_id: int | None = None
    auth_key_id: int | None = None


@dataclass
class _Entry:
    fault: Fault
    remaining: int | None


@dataclass
class FaultBook:
    """The active faults, in injection order; the first match of a kind wins."""

    _entries: dict[int, _Entry] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, fault: Fault) -> int:
        fault_id = next(self._ids)
        self._entries[fault_id] = _Entry(fault, fault.times)
        return fault_id

    def clear(self, fault_id: int | None = None) -> int:
        """Remove one fault (or all); returns how many were removed."""
        if fault_id is None:
            n = len(self._entries)
            self._entries.clear()
            return n
        return 1 if self._entries.pop(fault_id, None) else 0

    def active(self) -> dict[int, Fault]:
        return {i: e.fault for i, e in self._entries.items()}

    def match(
        self,
        kind: FaultKind,
        scope: Scope,
        method: MethodNames | None = None,
        *,
        consume: bool = True,
    ) -> Fault | None:
        """First active fault of ``kind`` applying to ``scope``/``method``; uses up one shot."""
        for fault_id, entry in list(self._entries.items()):
            f = entry.fault
            if f.kind != kind or not _in_scope(f, scope):
                continue
            if method is not None and not method.matches(f.method):
                continue
            if consume and entry.remaining is not None:
                entry.remaining -= 1
                if entry.remaining <= 0:
                    del self._entries[fault_id]
            return f
        return None


def _in_scope(fault: Fault, scope: Scope) -> bool:
    if fault.dc_id is not None and fault.dc_id != scope.dc_id:
        return False
    if fault.user_id is not None and fault.user_id != scope.user_id:
        return False
    return fault.auth_key_id is None or fault.auth_key_id == scope.auth_key_id
