"""Helpers shared by every test that talks to a :class:`LocalDC` through stock Telethon.

Telethon keeps two process-wide caches that leak between tests unless reset: the trusted
RSA keys (``telethon.crypto.rsa._server_keys``) and ``TelegramClient._config`` (the cached
``help.getConfig``, which holds the previous test's DC ports). :func:`telethon_isolation`
restores both.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from telethon import TelegramClient, errors
from telethon.crypto import rsa
from telethon.sessions import MemorySession, StringSession

if TYPE_CHECKING:
    from telethon.sessions.abstract import Session
    from telethon.tl import types

    from tgdaemon.localdc.server import LocalDC

#: Any api_id/api_hash works with localdc; these make it obvious in logs.
API_ID = 1
API_HASH = "0123456789abcdef0123456789abcdef"

#: Fast-failing defaults for tests (Telethon's own defaults wait tens of seconds).
CLIENT_DEFAULTS: dict[str, Any] = {
    "connection_retries": 3,
    "retry_delay": 0.2,
    "request_retries": 3,
    "timeout": 5,
    "auto_reconnect": True,
}


def trust_localdc(pem: str) -> int:
    """Make Telethon accept this localdc's RSA key (idempotent); returns its fingerprint."""
    import rsa as pyrsa
    from telethon.crypto.rsa import _compute_fingerprint

    fingerprint: int = _compute_fingerprint(pyrsa.PublicKey.load_pkcs1(pem.encode("ascii")))
    if fingerprint not in rsa._server_keys:
        rsa.add_key(pem, old=False)
    return fingerprint


def reset_telethon_config() -> None:
    """Forget the class-level help.getConfig cache (it names the previous test's ports)."""
    TelegramClient._config = None
    TelegramClient._cdn_config = None


@contextlib.contextmanager
def telethon_isolation() -> Iterator[None]:
    """Restore Telethon's trusted RSA keys and config cache on exit (and reset on entry)."""
    saved_keys = dict(rsa._server_keys)
    reset_telethon_config()
    try:
        yield
    finally:
        rsa._server_keys.clear()
        rsa._server_keys.update(saved_keys)
        reset_telethon_config()


def make_client(
    dc: LocalDC,
    dc_id: int = 1,
    session: Session | str | None = None,
    **kwargs: Any,
) -> TelegramClient:
    """A stock TelegramClient whose session points at ``dc``'s DC ``dc_id``.

    ``session``: None → a fresh MemorySession; a str → a StringSession (its own DC address
    is kept if it has one). Trusts the localdc RSA key. Extra kwargs go to TelegramClient.
    """
    return _client(dc.rsa_public_pem, dc.addresses, dc_id, session, kwargs)


def client_for_info(info: dict[str, Any], dc_id: int = 1, session: Session | str | None = None,
                    **kwargs: Any) -> TelegramClient:
    """Like :func:`make_client`, for a localdc in another process, from its CLI info file."""
    addresses = {int(d["id"]): (str(d["host"]), int(d["port"])) for d in info["dcs"]}
    return _client(str(info["rsa_public_key"]), addresses, dc_id, session, kwargs)


def _client(pem: str, addresses: dict[int, tuple[str, int]], dc_id: int,
            session: Session | str | None, kwargs: dict[str, Any]) -> TelegramClient:
    trust_localdc(pem)
    if session is None:
        live: Session = MemorySession()
    elif isinstance(session, str):
        live = StringSession(session)
    else:
        live = session
    if not live.server_address:
        host, port = addresses[dc_id]
        live.set_dc(dc_id, host, port)
    opts = {**CLIENT_DEFAULTS, **kwargs}
    return TelegramClient(live, API_ID, API_HASH, **opts)


def point_session(session: Session, dc: LocalDC, dc_id: int | None = None) -> None:
    """Re-point an existing session at the same DC of a (restarted) localdc."""
    dc_id = dc_id or session.dc_id
    host, port = dc.addresses[dc_id]
    key = session.auth_key
    session.set_dc(dc_id, host, port)
    session.auth_key = key


async def login(client: TelegramClient, dc: LocalDC, phone: str,
                password: str | None = None) -> types.User:
    """Connect and log ``client`` in through localdc: sendCode, signIn with the code sent,
    and the 2FA password when the account has one. Returns the logged-in user."""
    if not client.is_connected():
        await client.connect()
    await client.send_code_request(phone)
    code = dc.last_code(phone)
    if code is None:
        raise RuntimeError("localdc did not record a login code")
    try:
        user = await client.sign_in(phone, code)
    except errors.SessionPasswordNeededError:
        if password is None:
            raise
        user = await client.sign_in(password=password)
    return user


# -- daemon configs for a local DC (tests, make demo, make soak, make bench) -------------------


def toml_value(value: Any) -> str:
    """A TOML literal for the simple values a daemon config holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def daemon_config_toml(
    *,
    servers: Mapping[int, Sequence[str]],
    rsa_files: Sequence[Path],
    accounts: Sequence[Mapping[str, Any]],
    daemon: Mapping[str, Any],
    policy: Mapping[str, Any],
    header: str = "",
    security: Mapping[str, Any] | None = None,
) -> str:
    """A complete ``tgdaemon`` config whose servers are a local DC's (``servers``: DC id ->
    ``host:port`` addresses in failover order)."""
    lines = [f"# {header}"] if header else []
    lines += ["[daemon]", *(f"{k} = {toml_value(v)}" for k, v in daemon.items()), "",
              "[telegram]", f"api_id = {API_ID}", f"api_hash = {toml_value(API_HASH)}",
              f"rsa_keys = {toml_value(list(rsa_files))}", "", "[telegram.servers]"]
    lines += [f'"{dc}" = {toml_value(list(addrs))}' for dc, addrs in servers.items()]
    lines += ["", "[policy]", *(f"{k} = {toml_value(v)}" for k, v in policy.items())]
    if security:
        lines += ["", "[security]", *(f"{k} = {toml_value(v)}" for k, v in security.items())]
    for account in accounts:
        lines += ["", "[[accounts]]", *(f"{k} = {toml_value(v)}" for k, v in account.items())]
    return "\n".join(lines) + "\n"
