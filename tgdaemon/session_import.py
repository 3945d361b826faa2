"""Import existing Telethon sessions (a StringSession or a ``.session`` SQLite file).

The input is a live credential: errors describe what is wrong with it, never its content,
and exceptions are raised ``from None`` so no decoder message can carry a fragment along.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import sqlite3
import struct
from pathlib import Path

from tgdaemon.exceptions import AccountError, DecryptionError, TgdaemonError
from tgdaemon.handshake import AUTH_KEY_BYTES, padded_auth_key
from tgdaemon.lifecycle import Setup
from tgdaemon.store import AccountRecord, DeviceInfo, SessionData, Store

_STRING_VERSION = "1"
_LAYOUTS = {263: ">B4sH256s", 275: ">B16sH256s"}  # by decoded length (IPv4, IPv6)


class SessionImportError(TgdaemonError):
    """The given session is not a usable Telethon session."""

    exit_code = 65  # EX_DATAERR


def _validated(
    dc_id: int, address: str, port: int, key: bytes | None, user_id: int | None = None,
    state: tuple[int, int, int, int] | None = None,
) -> SessionData:
    if not key or not any(key):
        raise SessionImportError("the session has no auth key (it was never connected)")
    if len(key) > AUTH_KEY_BYTES:
        raise SessionImportError(f"the session's auth key is {len(key)} bytes, expected 256")
    # Shorter: the key's number kept as minimal bytes (Telethon does that 1 time in 256). The
    # server hashes the 256-byte form: left-padding gives the same number, the right bytes.
    key = padded_auth_key(bytes(key))
    if not 0 < dc_id < 10_000 or not 0 < port <= 65535 or not address:
        raise SessionImportError("the session has no valid data center address")
    pts, qts, date, seq = state if state else (None, None, None, None)
    return SessionData(dc_id, address, port, bytes(key), user_id, pts, qts, date, seq)


def parse_string_session(text: str) -> SessionData:
    """Decode a Telethon ``StringSession`` (``'1'`` + urlsafe base64 of dc, ip, port, key)."""
    s = text.strip()
    if not s:
        raise SessionImportError("empty input: expected a Telethon string session")
    if s[0] != _STRING_VERSION:
        raise SessionImportError("not a Telethon string session (unknown version prefix)")
    body = s[1:].rstrip("=")
    try:
        raw = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise SessionImportError("not a Telethon string session (invalid base64)") from None
    layout = _LAYOUTS.get(len(raw))
    if layout is None:
        raise SessionImportError(
            f"not a Telethon string session (decodes to {len(raw)} bytes, expected 263 or 275)"
        )
    dc_id, ip, port, key = struct.unpack(layout, raw)
    address = ipaddress.ip_address(ip).compressed
    return _validated(dc_id, address, port, key)


def read_sqlite_session(path: Path) -> SessionData:
    """Read a Telethon ``.session`` file (opened read-only; the file is never modified)."""
    path = Path(path)
    if not path.is_file():
        raise SessionImportError(f"{path}: no such session file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise SessionImportError(f"{path}: cannot open: {exc}") from None
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "sessions" not in tables:
            raise SessionImportError(f"{path} is not a Telethon session file (no sessions table)")
        rows = conn.execute("SELECT dc_id, server_address, port, auth_key FROM sessions").fetchall()
        if not rows:
            raise SessionImportError(f"{path}: the session file holds no session")
        if len(rows) > 1:
            raise SessionImportError(f"{path}: the session file holds {len(rows)} sessions")
        dc_id, address, port, key = rows[0]
        user_id = None
        if "entities" in tables:
            row = conn.execute("SELECT hash FROM entities WHERE id = 0").fetchone()
            user_id = row[0] if row else None  # Telethon stores the own id as entity 0's hash
        state = None
        if "update_state" in tables:
            row = conn.execute(
                "SELECT pts, qts, date, seq FROM update_state WHERE id = 0"
            ).fetchone()
            state = (int(row[0]), int(row[1]), int(row[2]), int(row[3])) \
                if row and all(isinstance(v, int) for v in row) else None
    except sqlite3.Error as exc:
        raise SessionImportError(f"{path} is not a readable session file: {exc}") from None
    finally:
        conn.close()
    if not key:
        raise SessionImportError(f"{path}: the session has no auth key (it was never connected)")
    for column, value, kinds in (("dc_id", dc_id, int), ("port", port, int),
                                 ("server_address", address, str), ("auth_key", key, bytes)):
        if not isinstance(value, kinds):
            # Only the type is named: the value may be (part of) the key.
            raise SessionImportError(
                f"{path}: sessions.{column} is {_sql_type(value)}, expected "
                f"{_sql_type(kinds())} (not a session Telethon wrote?)")
    if not isinstance(user_id, int):
        user_id = None
    try:
        return _validated(dc_id, address, port, key, user_id, state)
    except SessionImportError as exc:
        raise SessionImportError(f"{path}: {exc}") from None


def _sql_type(value: object) -> str:
    return {type(None): "NULL", int: "INTEGER", str: "TEXT", bytes: "BLOB",
            float: "REAL"}.get(type(value), type(value).__name__)


async def import_session(
    store: Store, name: str, data: SessionData, *, replace: bool = False,
    device: DeviceInfo | None = None,
) -> AccountRecord:
    """Create ``name`` if needed and store ``data`` durably (encrypted by the store).

    An existing session, readable or not, is only replaced when asked: overwriting a working
    auth key with a stale one loses the account until it logs in again, and a record this key
    ring cannot decrypt may be the only good copy (a wrong master key looks exactly so).
    The one implementation behind ``tgdaemon import`` and the library.
    """
    if not replace:
        try:
            existing = await store.load_session(name)
        except DecryptionError as exc:
            raise DecryptionError(
                f"account {name!r} has a stored session this key ring cannot decrypt ({exc}); "
                "importing would replace it: check the master key, or pass --force"
            ) from None
        if existing is not None and existing.auth_key is not None:
            raise AccountError(f"account {name!r} already has a session; use --force to "
                               "replace it")
    await store.ensure_account(name, device)
    await store.save_session(name, data)
    await store.update_account(name, status=Setup.IMPORTED.value, dc_id=data.dc_id,
                               user_id=data.user_id)
    record = await store.get_account(name)
    assert record is not None
    return record
