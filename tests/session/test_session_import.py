"""Import of Telethon StringSession text and .session files; errors never echo the input."""

from __future__ import annotations

import base64
import datetime
import os
import sqlite3
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from telethon.crypto import AuthKey
from telethon.sessions import SQLiteSession, StringSession
from telethon.tl import types

from tgdaemon.exceptions import AccountError
from tgdaemon.session_import import (
    SessionImportError,
    import_session,
    parse_string_session,
    read_sqlite_session,
)
from tgdaemon.store import Store


def string_session(dc: int, ip: str, port: int, key: bytes) -> str:
    s = StringSession()
    s.set_dc(dc, ip, port)
    s.auth_key = AuthKey(key)
    return s.save()


@pytest.mark.parametrize("ip", ["149.154.167.51", "2001:67c:4e8:f002::a"])
def test_parse_string_session(ip: str) -> None:
    key = os.urandom(256)
    data = parse_string_session("  " + string_session(2, ip, 443, key) + "\n")
    assert (data.dc_id, data.server_address, data.port, data.auth_key) == (2, ip, 443, key)
    assert data.user_id is None


@settings(max_examples=50, deadline=None)
@given(dc=st.integers(1, 5), port=st.integers(1, 65535), key=st.binary(min_size=256, max_size=256),
       ip=st.ip_addresses())
def test_parse_string_session_property(dc: int, port: int, key: bytes, ip) -> None:
    if not any(key):
        key = b"\x01" + key[1:]
    data = parse_string_session(string_session(dc, str(ip), port, key))
    assert (data.dc_id, data.server_address, data.port, data.auth_key) == (dc, str(ip), port, key)


SECRETISH = "1" + base64.urlsafe_b64encode(b"\x02" + b"SECRETSECRET" * 5).decode()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n", "empty"),
        ("2" + "A" * 351, "version prefix"),
        ("1" + "not base64 !!" * 20, "invalid base64"),
        (SECRETISH, "decodes to 61 bytes"),
    ],
)
def test_garbage_is_rejected_without_echo(text: str, message: str) -> None:
    with pytest.raises(SessionImportError, match=message) as info:
        parse_string_session(text)
    body = text.strip()[1:]
    assert not body or body[:12] not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__


def test_no_auth_key_string_session() -> None:
    # a valid layout whose key is all zeros (Telethon writes that for "no key")
    raw = b"\x02" + bytes([1, 2, 3, 4]) + (443).to_bytes(2, "big") + bytes(256)
    with pytest.raises(SessionImportError, match="no auth key"):
        parse_string_session("1" + base64.urlsafe_b64encode(raw).decode())


def make_sqlite_session(path: Path, key: bytes, *, self_id: int | None = None) -> None:
    s = SQLiteSession(str(path))
    s.set_dc(4, "149.154.167.91", 443)
    s.auth_key = AuthKey(key)
    if self_id is not None:
        s.process_entities(types.contacts.ResolvedPeer(None, [types.InputPeerUser(0, self_id)], []))
        s.set_update_state(0, types.updates.State(
            7, 8, datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC), 9, unread_count=0))
    s.save()
    s.close()


def test_read_sqlite_session(tmp_path: Path) -> None:
    key = os.urandom(256)
    path = tmp_path / "acct.session"
    make_sqlite_session(path, key, self_id=123456)
    before = path.read_bytes()
    data = read_sqlite_session(path)
    assert (data.dc_id, data.server_address, data.port, data.auth_key) == (
        4, "149.154.167.91", 443, key)
    assert data.user_id == 123456
    assert (data.pts, data.qts, data.seq) == (7, 8, 9)
    assert path.read_bytes() == before  # opened read-only
    assert sorted(p.name for p in tmp_path.iterdir()) == ["acct.session"]


def test_read_sqlite_session_read_only_file(tmp_path: Path) -> None:
    path = tmp_path / "ro.session"
    make_sqlite_session(path, os.urandom(256))
    path.chmod(stat.S_IRUSR)
    assert read_sqlite_session(path).dc_id == 4


def test_read_sqlite_session_errors(tmp_path: Path) -> None:
    with pytest.raises(SessionImportError, match="no such session file"):
        read_sqlite_session(tmp_path / "missing.session")
    junk = tmp_path / "junk.session"
    junk.write_bytes(b"definitely not sqlite" * 100)
    with pytest.raises(SessionImportError, match="not a readable session file"):
        read_sqlite_session(junk)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(SessionImportError, match="not a Telethon session file"):
        read_sqlite_session(other)
    empty = tmp_path / "empty.session"
    SQLiteSession(str(empty)).close()  # a fresh file has a row without a key
    with pytest.raises(SessionImportError, match=r"empty\.session.*(no auth key|no session)"):
        read_sqlite_session(empty)


async def test_import_into_store(tmp_path: Path, ring) -> None:
    key = os.urandom(256)
    text = string_session(2, "149.154.167.51", 443, key)
    async with await Store.open(tmp_path / "state", ring) as store:
        rec = await import_session(store, "imported", parse_string_session(text))
        assert rec.dc_id == 2
        loaded = await store.load_session("imported")
        assert loaded is not None
        assert loaded.auth_key == key
        with pytest.raises(AccountError, match="already has a session"):
            await import_session(store, "imported", parse_string_session(text))
        path = tmp_path / "b.session"
        make_sqlite_session(path, os.urandom(256), self_id=77)
        rec = await import_session(store, "imported", read_sqlite_session(path), replace=True)
        assert rec.user_id == 77
        assert rec.dc_id == 4
    raw = b"".join(p.read_bytes() for p in (tmp_path / "state").glob("tgdaemon.sqlite3*"))
    assert key[:32] not in raw  # encrypted on the way in
