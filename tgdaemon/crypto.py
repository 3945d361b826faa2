"""Encryption at rest: a key ring of AES-256-GCM data keys and authenticated records.

Record layout (bytes)::

    version (1) | key_id (4) | nonce (12, random) | ciphertext + 16-byte GCM tag

The associated data binds a record to ``(version, key_id, account, purpose)``: a record copied
into another account's row, or from one field into another, fails authentication instead of
silently decrypting into the wrong place.

Key file format (text, UTF-8; ``#`` starts a comment line, blank lines ignored)::

    # tgdaemon key ring
    tgdaemon-key v1 3fa2c1d0 <urlsafe base64 of 32 bytes> active
    tgdaemon-key v1 91bb02e4 <urlsafe base64 of 32 bytes>

``key_id`` is 8 lowercase hex digits; exactly one line carries ``active``.  Older keys stay in
the file after a rotation so records not yet re-encrypted remain readable until removed.

Master key sources, first found wins: ``$CREDENTIALS_DIRECTORY/tgdaemon.key`` (systemd
``LoadCredential=``), the configured key file (refused when group/other may read it), and
``TGDAEMON_MASTER_KEY`` (development only: key file text, or a bare base64 key).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import glob
import hashlib
import logging
import os
import re
import secrets
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tgdaemon.exceptions import DecryptionError, KeyMaterialError

log = logging.getLogger("tgdaemon.crypto")

RECORD_VERSION = 1
KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(">B4s12s")  # version, key_id, nonce
HEADER_SIZE = _HEADER.size
_KEY_ID_RE = re.compile(r"^[0-9a-f]{8}$")
_FILE_MAGIC = "tgdaemon-key"
_FILE_VERSION = "v1"

CREDENTIAL_NAME = "tgdaemon.key"
ENV_MASTER_KEY = "TGDAEMON_MASTER_KEY"


@dataclass(frozen=True)
class DataKey:
    """One AES-256 key and its short public id (the id is stored in every record)."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not _KEY_ID_RE.match(self.key_id):
            raise KeyMaterialError("key id must be 8 lowercase hex digits")
        if len(self.secret) != KEY_SIZE:
            raise KeyMaterialError(f"key {self.key_id} must be {KEY_SIZE} bytes")

    @classmethod
    def generate(cls) -> DataKey:
        return cls(secrets.token_hex(4), secrets.token_bytes(KEY_SIZE))


def _aad(version: int, key_id: bytes, account: str, purpose: str) -> bytes:
    # Length-prefixed so that ("ab", "c") and ("a", "bc") can never collide.
    acc = account.encode("utf-8")
    pur = purpose.encode("utf-8")
    return b"".join(
        (b"tgdaemon-record", bytes([version]), key_id,
         struct.pack(">I", len(acc)), acc, struct.pack(">I", len(pur)), pur)
    )


def record_key_id(record: bytes) -> str | None:
    """The key id a record claims to be encrypted under (None if it has no valid header)."""
    if len(record) < HEADER_SIZE + TAG_SIZE or record[0] != RECORD_VERSION:
        return None
    return record[1:5].hex()


class KeyRing:
    """Immutable set of data keys: one active (encrypts), all usable to decrypt."""

    __slots__ = ("_active", "_keys")

    def __init__(self, active: DataKey, others: Iterable[DataKey] = ()) -> None:
        keys: dict[str, DataKey] = {active.key_id: active}
        for k in others:
            if k.key_id in keys:
                if keys[k.key_id].secret != k.secret:
                    raise KeyMaterialError(f"key id {k.key_id} appears twice with different keys")
                continue
            keys[k.key_id] = k
        self._active = active
        self._keys = keys

    @property
    def active(self) -> DataKey:
        return self._active

    @property
    def key_ids(self) -> tuple[str, ...]:
        """All key ids, active first."""
        return tuple(self._keys)

    def __iter__(self) -> Iterator[DataKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self._keys

    def __repr__(self) -> str:
        return f"KeyRing(active={self._active.key_id!r}, keys={list(self._keys)!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyRing):
            return NotImplemented
        return self._active == other._active and self._keys == other._keys

    # Unhashable like any mutable value with __eq__; mypy wants a method here.
    __hash__ = None  # type: ignore[assignment]

    # -- records ---------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, *, account: str, purpose: str) -> bytes:
        key = self._active
        kid = bytes.fromhex(key.key_id)
        nonce = secrets.token_bytes(NONCE_SIZE)
        aad = _aad(RECORD_VERSION, kid, account, purpose)
        ct = AESGCM(key.secret).encrypt(nonce, plaintext, aad)
        return _HEADER.pack(RECORD_VERSION, kid, nonce) + ct

    def decrypt(self, record: bytes, *, account: str, purpose: str) -> bytes:
        what = f"{purpose} record of account {account!r}"
        if not isinstance(record, bytes | bytearray):  # never echo what it holds instead
            raise DecryptionError(f"cannot decrypt {what}: not a byte string")
        if len(record) < HEADER_SIZE + TAG_SIZE:
            raise DecryptionError(f"cannot decrypt {what}: record is truncated")
        version, kid, nonce = _HEADER.unpack_from(record)
        if version != RECORD_VERSION:
            raise DecryptionError(f"cannot decrypt {what}: unsupported record version {version}")
        key = self._keys.get(kid.hex())
        if key is None:
            raise DecryptionError(
                f"cannot decrypt {what}: encrypted under key id {kid.hex()}, which is not in "
                f"the key ring ({', '.join(self._keys)})"
            )
        try:
            return AESGCM(key.secret).decrypt(
                nonce, record[HEADER_SIZE:], _aad(version, kid, account, purpose)
            )
        except InvalidTag:
            raise DecryptionError(
                f"cannot decrypt {what}: authentication failed under key {key.key_id} "
                "(wrong key, tampered record, or record copied from another account/field)"
            ) from None

    # -- rotation --------------------------------------------------------------------------

    def with_new_active(self) -> KeyRing:
        """A ring whose active key is new; every current key stays readable."""
        new = DataKey.generate()
        while new.key_id in self._keys:  # 1 in 4e9, but cheap to rule out
            new = DataKey.generate()
        return KeyRing(new, self._keys.values())

    def check_replacement(self, new: KeyRing) -> None:
        """Refuse ``new`` as the running ring's successor unless it keeps every key: records
        under a dropped key would become unreadable (a reload after ``rotate-key``)."""
        missing = [k for k in self._keys if k not in new._keys]
        if missing:
            raise DecryptionError(
                f"the new key ring lacks key(s) {', '.join(missing)} of the running one; "
                "records under them would become unreadable: keeping the running ring")

    def with_active(self, key_id: str) -> KeyRing:
        """The same keys with ``key_id`` encrypting (a fleet writes under the newest key
        every instance holds, tgdaemon/keyrotation.py)."""
        if key_id not in self._keys:
            raise KeyMaterialError(f"key {key_id} is not in the key ring")
        if key_id == self._active.key_id:
            return self
        return KeyRing(self._keys[key_id], self._keys.values())

    def without(self, key_id: str) -> KeyRing:
        """A ring without ``key_id`` (records under it become unreadable)."""
        if key_id == self._active.key_id:
            raise KeyMaterialError(f"cannot remove the active key {key_id}")
        if key_id not in self._keys:
            raise KeyMaterialError(f"key {key_id} is not in the key ring")
        return KeyRing(self._active, (k for k in self._keys.values() if k.key_id != key_id))

    # -- key file text ---------------------------------------------------------------------

    def dumps(self) -> str:
        lines = ["# tgdaemon key ring: keep secret, mode 0600. Exactly one key is active."]
        for k in self._keys.values():
            b64 = base64.urlsafe_b64encode(k.secret).decode("ascii")
            suffix = " active" if k is self._active else ""
            lines.append(f"{_FILE_MAGIC} {_FILE_VERSION} {k.key_id} {b64}{suffix}")
        return "\n".join(lines) + "\n"

    @classmethod
    def loads(cls, text: str, *, source: str = "<key text>") -> KeyRing:
        """Parse key file text; errors name the source and line, never the key material."""
        active: DataKey | None = None
        others: list[DataKey] = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            where = f"{source} line {lineno}"
            if len(parts) not in (4, 5) or parts[0] != _FILE_MAGIC:
                raise KeyMaterialError(f"{where}: not a '{_FILE_MAGIC}' line")
            if parts[1] != _FILE_VERSION:
                raise KeyMaterialError(f"{where}: unsupported key format {parts[1][:8]!r}")
            if len(parts) == 5 and parts[4] != "active":
                raise KeyMaterialError(f"{where}: unexpected trailing field")
            if not _KEY_ID_RE.match(parts[2]):
                raise KeyMaterialError(f"{where}: key id must be 8 lowercase hex digits")
            secret = _b64_key(parts[3], where)
            key = DataKey(parts[2], secret)
            if len(parts) == 5:
                if active is not None:
                    raise KeyMaterialError(f"{where}: more than one active key")
                active = key
            else:
                others.append(key)
        if active is None:
            raise KeyMaterialError(f"{source}: no active key (mark one line 'active')")
        return cls(active, others)


def _b64_key(text: str, where: str) -> bytes:
    try:
        norm = text.strip().rstrip("=").replace("+", "-").replace("/", "_")
        norm += "=" * (-len(norm) % 4)
        raw = base64.b64decode(norm.encode("ascii"), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise KeyMaterialError(f"{where}: key is not valid base64") from None
    if len(raw) != KEY_SIZE:
        raise KeyMaterialError(f"{where}: key must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def generate_keyring() -> KeyRing:
    return KeyRing(DataKey.generate())


def _derived_key_id(secret: bytes) -> str:
    return hashlib.sha256(b"tgdaemon key id\x00" + secret).hexdigest()[:8]


def _read_key_file(path: Path, *, check_mode: bool) -> KeyRing:
    try:
        st = path.stat()
        if check_mode and st.st_mode & 0o077:
            raise KeyMaterialError(
                f"key file {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must not be "
                f"accessible by group or others (chmod 600 {path})"
            )
        text = path.read_text(encoding="utf-8")
    except KeyMaterialError:
        raise
    except UnicodeDecodeError:
        raise KeyMaterialError(f"key file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise KeyMaterialError(f"cannot read key file {path}: {exc.strerror}") from None
    return KeyRing.loads(text, source=str(path))


def load_keyring(*, key_file: Path | None, env: Mapping[str, str] = os.environ) -> KeyRing:
    """Find the master key ring: systemd credential, then key file, then dev environment."""
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        cred = Path(cred_dir) / CREDENTIAL_NAME
        if cred.exists():
            # systemd owns the credential's permissions; it is private to the unit.
            log.info("master key from systemd credential %s", cred)
            return _read_key_file(cred, check_mode=False)
    if key_file is not None:
        log.info("master key from key file %s", key_file)
        return _read_key_file(Path(key_file), check_mode=True)
    text = env.get(ENV_MASTER_KEY)
    if text:
        log.warning(
            "master key from $%s: for development only, use a key file or a systemd credential",
            ENV_MASTER_KEY,
        )
        if _FILE_MAGIC in text:
            return KeyRing.loads(text.replace(";", "\n"), source=f"${ENV_MASTER_KEY}")
        secret = _b64_key(text.strip(), f"${ENV_MASTER_KEY}")
        return KeyRing(DataKey(_derived_key_id(secret), secret))
    raise KeyMaterialError(
        "no master key: expected $CREDENTIALS_DIRECTORY/tgdaemon.key, a key file in the "
        f"configuration, or ${ENV_MASTER_KEY} (development); create one with 'tgdaemon keygen'"
    )


_TMP_SUFFIX = ".tmp"


def remove_stale_temp_files(path: Path) -> int:
    """Remove temporary files an interrupted :func:`write_key_file` left beside ``path``
    (each holds a whole key ring); returns how many. Called before every key file write and
    at daemon start; only one writer runs at a time (the state lock), so none is live."""
    path = Path(path)
    removed = 0
    with contextlib.suppress(OSError):
        for tmp in path.parent.glob(f".{glob.escape(path.name)}.*{_TMP_SUFFIX}"):
            try:
                tmp.unlink()
            except OSError as exc:
                log.warning("cannot remove stale temporary key file %s: %s", tmp, exc.strerror)
            else:
                removed += 1
    if removed:
        log.warning("removed %d temporary key file(s) left by an interrupted key write beside %s",
                    removed, path)
    return removed


def write_key_file(path: Path, ring: KeyRing, *, overwrite: bool = False) -> None:
    """Write ``ring`` atomically with mode 0600; an existing file is kept unless ``overwrite``.

    The file is complete and fsynced before it becomes visible under ``path``, so a crash
    never leaves a truncated key file (which would lock every account out).
    """
    path = Path(path)
    directory = path.parent
    if not directory.is_dir():
        raise KeyMaterialError(f"cannot write key file {path}: directory {directory} does not "
                               "exist")
    remove_stale_temp_files(path)
    tmp = directory / f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
    data = ring.dumps().encode("utf-8")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise KeyMaterialError(f"cannot write key file {path}: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)  # in case of an unusual umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError:
                raise KeyMaterialError(
                    f"key file {path} already exists; refusing to overwrite it"
                ) from None
            os.unlink(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
