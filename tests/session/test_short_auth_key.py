"""Issue 10 item 6: auth keys whose value needs fewer than 256 bytes.

Telethon keeps g^ab as minimal bytes, so 1 key exchange in 256 yields a 255-byte key whose
id and hashes differ from the 256-byte key the server uses. localdc's ``short_auth_keys``
option makes every exchange that case (DH over a modulus below 2^2040): stock Telethon then
fails the exchange's own nonce-hash check, while the daemon's client creates the 256-byte
key, logs in, and keeps working across a localdc restart and a daemon restart.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import phone_for
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.handshake import padded_auth_key
from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.crypto import key_id_of
from tgdaemon.localdc.testing import make_client
from tgdaemon.session_import import SessionImportError, read_sqlite_session
from tgdaemon.status import State
from tgdaemon.store import Store


@pytest.fixture
async def localdc(tmp_path: Path, isolated_telethon: None) -> AsyncIterator[LocalDC]:
    async with LocalDC(tmp_path / "localdc", dcs=2, short_auth_keys=True) as dc:
        yield dc


async def test_stock_telethon_fails_a_short_key_exchange(localdc: LocalDC) -> None:
    """The option really produces the short case: Telethon's minimal-bytes key fails."""
    client = make_client(localdc, connection_retries=0, retry_delay=0)
    with pytest.raises(ConnectionError):
        await client.connect()
    await client.disconnect()
    assert localdc.counters()["key_exchanges"] == 1  # the server finished; the client refused


def connected(daemon: Daemon, name: str) -> bool:
    entry = daemon.board.get(name)
    return entry is not None and entry.state == State.CONNECTED


async def test_short_key_logs_in_survives_localdc_and_daemon_restarts(
        tmp_path, make_config, login_account, localdc, wait_until) -> None:
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": ""})
    user_id = await login_account(config, "alice")
    ring = load_keyring(key_file=config.daemon.master_key_file)
    async with await Store.open(config.daemon.state_dir, ring) as store:
        data = await store.load_session("alice")
    assert data is not None
    assert data.auth_key is not None
    key = data.auth_key
    assert len(key) == 256
    assert key[0] == 0, "the key's value needs fewer than 256 bytes"
    assert localdc.auth_key_ids(user_id=user_id) == [key_id_of(key)]

    port = localdc.addresses[1][1]
    restarted = LocalDC(localdc.state_dir, dcs=1, port=port)
    try:
        async with Daemon(config) as daemon:
            await wait_until(lambda: connected(daemon, "alice"), 20, "connected")
            await localdc.stop()
            await wait_until(lambda: not connected(daemon, "alice"), 20, "connection lost")
            await restarted.start()  # same state, same port: the stored key must match
            await wait_until(lambda: connected(daemon, "alice"), 30, "reconnected")
        async with Daemon(config) as daemon:
            await wait_until(lambda: connected(daemon, "alice"), 20,
                             "connected after a daemon restart")
        counters = restarted.counters()
        assert counters["key_exchanges"] == 0
        assert counters["auth_key_not_found"] == 0
    finally:
        await restarted.stop()
    async with await Store.open(config.daemon.state_dir, ring) as store:
        after = await store.load_session("alice")
    assert after is not None
    assert after.auth_key == key


def _session_file(path: Path, key: bytes) -> Path:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE sessions (dc_id INTEGER PRIMARY KEY, server_address TEXT, "
                   "port INTEGER, auth_key BLOB, takeout_id INTEGER)")
        db.execute("INSERT INTO sessions VALUES (2, '127.0.0.1', 443, ?, NULL)", (key,))
    db.close()
    return path


def test_imported_short_key_is_left_padded_and_long_one_refused(tmp_path: Path) -> None:
    short = bytes(range(1, 256))  # 255 bytes: the number 0x0102...ff
    data = read_sqlite_session(_session_file(tmp_path / "short.session", short))
    assert data.auth_key == b"\0" + short == padded_auth_key(short)
    with pytest.raises(SessionImportError, match="257 bytes, expected 256"):
        read_sqlite_session(_session_file(tmp_path / "long.session", b"\1" * 257))
