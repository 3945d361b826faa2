"""The ``[api]`` section: who may act through which accounts, and the account API's bounds.

Kept apart from :mod:`tgdaemon.config` (which only hooks :func:`parse_api` in) because it is
one domain: the account API's clients and limits. Tokens are read when the config is loaded
(``check-config`` proves they are readable) and never appear in a repr or an error message.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tgdaemon.config import _Parser


class ApiMethod(StrEnum):
    """What an API client may be allowed to do; also the ``method`` metric label."""

    ACCOUNTS = "accounts"  # GET /v1/accounts[/{name}]
    DIALOGS = "dialogs"
    HISTORY = "history"
    UPDATES = "updates"  # GET /v1/updates (WebSocket)
    SEND_MESSAGE = "send_message"
    READ = "read"  # mark read
    INVOKE = "invoke"  # any TL method
    SESSIONS = "sessions"  # list the account's sessions (authorizations)
    TERMINATE_SESSIONS = "terminate_sessions"  # log other sessions out


#: ``methods = "read-only"``: nothing that changes state on Telegram.
READ_ONLY: frozenset[ApiMethod] = frozenset(
    {ApiMethod.ACCOUNTS, ApiMethod.DIALOGS, ApiMethod.HISTORY, ApiMethod.UPDATES,
     ApiMethod.SESSIONS})
ALL_METHODS: frozenset[ApiMethod] = frozenset(ApiMethod)


@dataclass(frozen=True)
class ApiClient:
    """One ``[[api.clients]]`` entry; the token stays out of the repr."""

    name: str
    token: str = field(repr=False)
    token_file: Path
    accounts: tuple[str, ...] = ("*",)
    methods: frozenset[ApiMethod] = ALL_METHODS

    def may_use(self, account: str) -> bool:
        """Account names or shell globs (``shop-*``); case-sensitive like the names."""
        return self._pattern.match(account) is not None

    @functools.cached_property
    def _pattern(self) -> re.Pattern[str]:
        """The globs as one compiled regex: a glob client's stream or account list checks
        every account of the fleet (10,000 ``fnmatchcase`` calls took ~4x as long)."""
        return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in self.accounts))

    def may_call(self, method: ApiMethod) -> bool:
        return method in self.methods


@dataclass(frozen=True)
class ApiConfig:
    clients: tuple[ApiClient, ...] = ()
    #: Update events kept per account (persisted) for consumers resuming with a cursor.
    updates_buffer: int = 1000
    #: Calls of one account running at once, and waiting beyond those.
    account_concurrency: int = 4
    account_queue: int = 64
    #: Daemon-wide: calls running at once, calls waiting beyond those, and calls started per
    #: second (0 = no rate limit); see :mod:`tgdaemon.api.admission`.
    max_in_flight: int = 32
    max_queued: int = 512
    max_rate: float = 100.0
    #: Seconds a call may take, queueing included.
    request_timeout: float = 30.0
    #: Also serve the API on this Unix socket (mode 0660: the daemon's user and group).
    unix_socket: Path | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.clients)


_KEYS = ("clients", "updates_buffer", "account_concurrency", "account_queue", "max_in_flight",
         "max_queued", "max_rate", "request_timeout", "unix_socket")
_CLIENT_KEYS = ("name", "token_file", "accounts", "methods")


def parse_api(p: _Parser, value: Any) -> ApiConfig:
    """Validate the ``[api]`` table, reporting problems through the config parser."""
    d = ApiConfig()
    t = p.table(value, "api", _KEYS)
    raw_clients = t.get("clients", [])
    clients: list[ApiClient] = []
    if not isinstance(raw_clients, list):
        p.err("api.clients", "must be an array of tables ([[api.clients]])")
        raw_clients = []
    seen_names: set[str] = set()
    seen_tokens: set[str] = set()
    for i, item in enumerate(raw_clients):
        client = _client(p, item, f"api.clients[{i}]")
        if client is None:
            continue
        if client.name in seen_names:
            p.err(f"api.clients[{i}].name", f"duplicate client name {client.name!r}")
        elif client.token in seen_tokens:
            p.err(f"api.clients[{i}].token_file", "the same token as another client")
        seen_names.add(client.name)
        seen_tokens.add(client.token)
        clients.append(client)
    return ApiConfig(
        clients=tuple(clients),
        updates_buffer=p.number(t, "api", "updates_buffer", int, d.updates_buffer, minimum=1),
        account_concurrency=p.number(t, "api", "account_concurrency", int,
                                     d.account_concurrency, minimum=1),
        account_queue=p.number(t, "api", "account_queue", int, d.account_queue, minimum=0),
        max_in_flight=p.number(t, "api", "max_in_flight", int, d.max_in_flight, minimum=1),
        max_queued=p.number(t, "api", "max_queued", int, d.max_queued, minimum=0),
        max_rate=p.number(t, "api", "max_rate", float, d.max_rate, minimum=0),
        request_timeout=p.number(t, "api", "request_timeout", float, d.request_timeout,
                                 minimum=0, exclusive=True),
        unix_socket=_unix_socket(p, t),
    )


def _unix_socket(p: _Parser, t: Mapping[str, Any]) -> Path | None:
    path = p.file_path(t, "api", "unix_socket")
    if path is not None and len(os.fsencode(path)) > 107:
        p.err("api.unix_socket", "path longer than 107 bytes (the limit of a Unix socket)")
        return None
    return path


def _client(p: _Parser, value: Any, prefix: str) -> ApiClient | None:
    if not isinstance(value, Mapping):
        p.err(prefix, "must be a table")
        return None
    before = len(p.problems)
    t = p.table(value, prefix, _CLIENT_KEYS)
    from tgdaemon.config import NAME_RE

    name = p.get(t, prefix, "name", str, "")
    if "name" not in t:
        p.err(f"{prefix}.name", "required")
    elif not NAME_RE.fullmatch(name):
        p.err(f"{prefix}.name", f"must match {NAME_RE.pattern}")
    token_file = p.file_path(t, prefix, "token_file")
    token = ""
    if token_file is None:
        p.err(f"{prefix}.token_file", "required")
    else:
        token = _token(p, token_file, f"{prefix}.token_file")
    accounts = _accounts(p, t.get("accounts"), f"{prefix}.accounts")
    methods = _methods(p, t.get("methods", "all"), f"{prefix}.methods")
    if len(p.problems) != before or token_file is None:
        return None
    return ApiClient(name=name, token=token, token_file=token_file, accounts=accounts,
                     methods=methods)


def _token(p: _Parser, path: Path, key: str) -> str:
    raw = p.read(path, key)
    if raw is None:
        return ""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = 0
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        p.err(key, f"{path} must not be readable by group or others (chmod 600)")
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        token = ""
    # Never echo the value: it is a credential.
    if len(token) < 16 or not token.isprintable() or " " in token:
        p.err(key, "must hold one token of at least 16 printable ASCII characters")
        return ""
    return token


def _accounts(p: _Parser, value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        p.err(key, "required: account names or globs, e.g. [\"alice\", \"shop-*\"] or [\"*\"]")
        return ()
    if not isinstance(value, list) or not value or not all(
            isinstance(v, str) and v for v in value):
        p.err(key, "must be a non-empty array of account names or globs")
        return ()
    return tuple(value)


def _methods(p: _Parser, value: Any, key: str) -> frozenset[ApiMethod]:
    if value == "read-only":
        return READ_ONLY
    if value == "all":
        return ALL_METHODS
    names = [m.value for m in ApiMethod]
    if not isinstance(value, list) or not value:
        p.err(key, f"must be \"all\", \"read-only\" or a non-empty array of {'|'.join(names)}")
        return frozenset()
    out: set[ApiMethod] = set()
    for i, item in enumerate(value):
        if item not in names:
            p.err(f"{key}[{i}]", f"must be one of {'|'.join(names)}")
        else:
            out.add(ApiMethod(item))
    return frozenset(out)


def authenticate(clients: Iterable[ApiClient], token: str) -> ApiClient | None:
    """The client owning ``token``; every token is compared in constant time (no early exit,
    so the time taken does not say which client nearly matched)."""
    import hmac

    given = token.encode()
    found = None
    for client in clients:
        if hmac.compare_digest(given, client.token.encode()):
            found = client
    return found
