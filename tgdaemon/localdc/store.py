"""Persistent state of the local DC: RSA key, auth keys, users, 2FA verifiers.

Everything lives in memory (dicts) and is written through to one SQLite file in the state
directory, so a restarted localdc keeps sessions valid. Writes are tiny and synchronous on
purpose: stdlib sqlite3 in WAL mode commits in microseconds, far cheaper than a thread hop.
"""

from __future__ import annotations

import logging
import os
import secrets
import sqlite3
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from tgdaemon.exceptions import StoreError
from tgdaemon.localdc.crypto import ServerRsaKey, SrpVerifier

log = logging.getLogger("tgdaemon.localdc.store")

FIRST_USER_ID = 5_000_001

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS auth_keys (
    key_id INTEGER PRIMARY KEY, dc_id INTEGER NOT NULL, key BLOB NOT NULL,
    user_id INTEGER, layer INTEGER
);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY, phone TEXT NOT NULL UNIQUE, first_name TEXT NOT NULL,
    access_hash INTEGER NOT NULL, pts INTEGER NOT NULL, home_dc INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS passwords (
    phone TEXT PRIMARY KEY, salt1 BLOB NOT NULL, salt2 BLOB NOT NULL, verifier BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS clients (
    key_id INTEGER PRIMARY KEY, api_id INTEGER NOT NULL, device_model TEXT NOT NULL,
    system_version TEXT NOT NULL, app_version TEXT NOT NULL,
    auth_hash INTEGER, authorized_at INTEGER
);
"""


def _signed(u64: int) -> int:
    value: int = struct.unpack("<q", struct.pack("<Q", u64))[0]
    return value


def _unsigned(i64: int) -> int:
    value: int = struct.unpack("<Q", struct.pack("<q", i64))[0]
    return value


@dataclass(frozen=True)
class AuthKeyRecord:
    key_id: int  # unsigned 64-bit, as on the wire
    dc_id: int
    key: bytes
    user_id: int | None = None
    layer: int | None = None

    def __repr__(self) -> str:  # never the key bytes
        return (f"AuthKeyRecord(key_id={self.key_id}, dc_id={self.dc_id}, "
                f"user_id={self.user_id}, layer={self.layer})")


@dataclass(frozen=True)
class UserRecord:
    id: int
    phone: str
    first_name: str
    access_hash: int
    pts: int
    home_dc: int

    def __repr__(self) -> str:  # never the phone number
        return f"UserRecord(id={self.id}, pts={self.pts}, home_dc={self.home_dc})"


@dataclass(frozen=True)
class ClientRecord:
    """What an auth key's app said in initConnection, and the login it belongs to.

    ``auth_hash`` names the authorization (one per sign-in, Telegram's ``Authorization.hash``);
    keys a login was carried to with export/importAuthorization share their login's hash, so
    one login on several DCs is one authorization, as Telegram lists it.
    """

    key_id: int
    api_id: int
    device_model: str
    system_version: str
    app_version: str
    auth_hash: int | None = None
    authorized_at: int | None = None  # unix time of the sign-in


class Store:
    """In-memory registry with write-through persistence (``path=None``: memory only)."""

    def __init__(self, state_dir: Path | None) -> None:
        self._db: sqlite3.Connection | None = None
        self.auth_keys: dict[int, AuthKeyRecord] = {}
        self.users: dict[int, UserRecord] = {}
        self.users_by_phone: dict[str, int] = {}
        self.passwords: dict[str, SrpVerifier] = {}
        self.clients: dict[int, ClientRecord] = {}
        self.rsa_key: ServerRsaKey
        if state_dir is not None:
            try:
                state_dir.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(state_dir / "localdc.sqlite3", isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise StoreError(f"cannot open localdc state in {state_dir}: {exc}") from exc
            self._load()
        else:
            self.rsa_key = ServerRsaKey.generate()

    def _load(self) -> None:
        assert self._db is not None
        row = self._db.execute("SELECT v FROM meta WHERE k='rsa_private_pem'").fetchone()
        if row is None:
            self.rsa_key = ServerRsaKey.generate()
            self._db.execute("INSERT INTO meta VALUES ('rsa_private_pem', ?)",
                             (self.rsa_key.private_pem,))
            path = self._db.execute("PRAGMA database_list").fetchone()[2]
            if path:
                os.chmod(path, 0o600)
        else:
            self.rsa_key = ServerRsaKey(bytes(row[0]))
        for key_id, dc_id, key, user_id, layer in self._db.execute(
            "SELECT key_id, dc_id, key, user_id, layer FROM auth_keys"
        ):
            rec = AuthKeyRecord(_unsigned(key_id), dc_id, bytes(key), user_id, layer)
            self.auth_keys[rec.key_id] = rec
        for uid, phone, name, ah, pts, home in self._db.execute(
            "SELECT id, phone, first_name, access_hash, pts, home_dc FROM users"
        ):
            self.users[uid] = UserRecord(uid, phone, name, ah, pts, home)
            self.users_by_phone[phone] = uid
        for phone, s1, s2, v in self._db.execute(
            "SELECT phone, salt1, salt2, verifier FROM passwords"
        ):
            self.passwords[phone] = SrpVerifier(bytes(s1), bytes(s2), bytes(v))
        for key_id, *fields in self._db.execute(
            "SELECT key_id, api_id, device_model, system_version, app_version, auth_hash,"
            " authorized_at FROM clients"
        ):
            self.clients[_unsigned(key_id)] = ClientRecord(_unsigned(key_id), *fields)
        log.info("localdc state loaded: %d auth keys, %d users",
                 len(self.auth_keys), len(self.users))

    @property
    def db(self) -> sqlite3.Connection | None:
        """The open database (None when memory-only), for modules that keep their own tables
        in the same file (tgdaemon.localdc.updates)."""
        return self._db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _exec(self, sql: str, args: tuple[object, ...]) -> None:
        if self._db is not None:
            self._db.execute(sql, args)

    # -- auth keys ---------------------------------------------------------------------------

    def put_auth_key(self, rec: AuthKeyRecord) -> None:
        self.auth_keys[rec.key_id] = rec
        self._exec(
            "INSERT OR REPLACE INTO auth_keys VALUES (?, ?, ?, ?, ?)",
            (_signed(rec.key_id), rec.dc_id, rec.key, rec.user_id, rec.layer),
        )

    def update_auth_key(self, key_id: int, **changes: object) -> AuthKeyRecord | None:
        rec = self.auth_keys.get(key_id)
        if rec is None:
            return None
        # Field names and types are the caller's (localdc's own code); replace() checks names.
        rec = replace(rec, **changes)  # type: ignore[arg-type]
        self.put_auth_key(rec)
        return rec

    def delete_auth_key(self, key_id: int) -> bool:
        if self.auth_keys.pop(key_id, None) is None:
            return False
        self._exec("DELETE FROM auth_keys WHERE key_id=?", (_signed(key_id),))
        if self.clients.pop(key_id, None) is not None:
            self._exec("DELETE FROM clients WHERE key_id=?", (_signed(key_id),))
        return True

    # -- clients (initConnection) and authorizations -----------------------------------------

    def put_client(self, rec: ClientRecord) -> None:
        if self.clients.get(rec.key_id) == rec:
            return
        self.clients[rec.key_id] = rec
        self._exec(
            "INSERT OR REPLACE INTO clients VALUES (?, ?, ?, ?, ?, ?, ?)",
            (_signed(rec.key_id), rec.api_id, rec.device_model, rec.system_version,
             rec.app_version, rec.auth_hash, rec.authorized_at),
        )

    # -- users -------------------------------------------------------------------------------

    def get_or_create_user(self, phone: str, home_dc: int) -> UserRecord:
        uid = self.users_by_phone.get(phone)
        if uid is not None:
            return self.users[uid]
        uid = max(self.users, default=FIRST_USER_ID - 1) + 1
        rec = UserRecord(uid, phone, f"Local {uid}", secrets.randbits(63), 1, home_dc)
        self._save_user(rec)
        log.info("localdc created user %d", uid)
        return rec

    def _save_user(self, rec: UserRecord) -> None:
        self.users[rec.id] = rec
        self.users_by_phone[rec.phone] = rec.id
        self._exec(
            "INSERT OR REPLACE INTO users VALUES (?, ?, ?, ?, ?, ?)",
            (rec.id, rec.phone, rec.first_name, rec.access_hash, rec.pts, rec.home_dc),
        )

    def bump_pts(self, user_id: int, by: int = 1) -> int:
        rec = self.users[user_id]
        rec = replace(rec, pts=rec.pts + by)
        self._save_user(rec)
        return rec.pts

    # -- 2FA ---------------------------------------------------------------------------------

    def set_password(self, phone: str, verifier: SrpVerifier | None) -> None:
        if verifier is None:
            self.passwords.pop(phone, None)
            self._exec("DELETE FROM passwords WHERE phone=?", (phone,))
        else:
            self.passwords[phone] = verifier
            self._exec(
                "INSERT OR REPLACE INTO passwords VALUES (?, ?, ?, ?)",
                (phone, verifier.salt1, verifier.salt2, verifier.verifier),
            )
