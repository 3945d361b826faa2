"""Issue 11 items 3 and 4 against the real daemon process and the real CLI: a wrong master
key is loud (ERROR, metric, /readyz) and never leads to the only good record being replaced;
a record stored as TEXT parks only its account and no record bytes reach a log."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiohttp

from tests.cli.test_cli import arun_cli
from tests.conftest import phone_for, wait_for_condition
from tests.daemon.test_process import accounts, free_port, start_daemon, states_are
from tests.hardening.tables import table_column
from tgdaemon.crypto import generate_keyring, write_key_file
from tgdaemon.store import DB_NAME


async def _get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, await r.text()


def _records(state_dir: Path) -> dict[str, bytes]:
    with sqlite3.connect(state_dir / DB_NAME) as db:
        return {a: bytes(r) for a, r in db.execute("SELECT account, record FROM sessions")}


async def test_wrong_master_key_is_loud_and_login_keeps_the_record(
        make_config, login_account, localdc, notify, processes, key_file, state_dir):
    port = free_port()
    config = make_config(accounts("alice"), daemon={"http_listen": f"127.0.0.1:{port}"})
    await login_account(config, "alice")
    good = key_file.read_bytes()
    before = _records(state_dir)["alice"]
    write_key_file(key_file, generate_keyring(), overwrite=True)  # the operator's mistake

    daemon = await start_daemon(processes, config.path, notify)
    await notify.wait("READY", "1")
    await daemon.wait_log(r"ERROR.*1 of 1 stored session record\(s\) cannot be decrypted.*"
                          r"wrong master key")
    assert sum("cannot be decrypted with this key ring" in line for line in daemon.lines) == 1
    status, body = await _get(port, "/readyz")
    assert status == 503, body
    status, body = await _get(port, "/metrics")
    assert 'tgdaemon_session_records{state="undecryptable"} 1.0' in body
    assert 'tgdaemon_session_records{state="readable"} 0.0' in body

    code, out, err = await arun_cli("accounts", "--config", str(config.path))
    assert code == 65, (out, err)
    assert "undecryptable" in out.splitlines()[1]
    assert "wrong master key" in err
    assert "Traceback" not in err

    # The README's old advice, `tgdaemon login alice`, must not replace the only good record.
    code, out, err = await arun_cli("login", "alice", "--config", str(config.path),
                                    stdin="12345\n")
    assert code == 65, (out, err)
    assert "--force" in err
    assert "Traceback" not in err
    assert _records(state_dir)["alice"] == before
    assert localdc.last_code(phone_for("alice")) is not None  # only the first login's code
    await daemon.kill()

    # With the right key back, the same record works: nothing was lost.
    key_file.write_bytes(good)
    code, out, err = await arun_cli("accounts", "--config", str(config.path))
    assert code == 0, err
    assert table_column(out, "SESSION") == "ok"
    assert "warning" not in err


async def test_record_stored_as_text_parks_only_that_account(
        make_config, login_account, localdc, notify, processes, state_dir):
    port = free_port()
    config = make_config(accounts("alice", "bob"), daemon={"http_listen": f"127.0.0.1:{port}"})
    for name in ("alice", "bob"):
        await login_account(config, name)
    record = _records(state_dir)["bob"]
    with sqlite3.connect(state_dir / DB_NAME) as db:
        db.execute("UPDATE sessions SET record = CAST(record AS TEXT) WHERE account = 'bob'")
        assert db.execute("SELECT typeof(record) FROM sessions WHERE account='bob'"
                          ).fetchone() == ("text",)

    daemon = await start_daemon(processes, config.path, notify)
    await notify.wait("READY", "1")
    await wait_for_condition(
        lambda: states_are(port, {"alice": "connected", "bob": "needs_login"}), 15,
        "alice connected, bob parked")
    status, _ = await _get(port, "/readyz")
    assert status == 200  # one record unreadable: loud, but the fleet is usable
    await daemon.wait_log(r"ERROR.*1 of 2 stored session record\(s\).*bob")
    code, out, err = await arun_cli("accounts", "--config", str(config.path))
    assert code == 65
    assert "stored as TEXT" in err
    assert "Traceback" not in err
    await daemon.kill()
    assert daemon.running() is False
    everything = daemon.log + out + err
    for fragment in (record[5:17].hex(), repr(record[5:17])[2:-1],
                     record[17:29].decode("latin-1"), "Could not decode"):
        assert fragment not in everything
