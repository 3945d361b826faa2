"""The ``tgdaemon`` command line: real files, real store, real local DC where it talks to one."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from telethon import TelegramClient
from telethon.sessions import SQLiteSession, StringSession

from tests.conftest import phone_for
from tgdaemon.cli import main
from tgdaemon.crypto import KeyRing
from tgdaemon.localdc.testing import login, make_client
from tgdaemon.store import Store


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI as an operator runs it: a separate process, real exit code and output."""
    return subprocess.run([sys.executable, "-m", "tgdaemon", *args], input=stdin,
                          capture_output=True, text=True, timeout=60, check=False)


async def arun_cli(*args: str, stdin: str = "") -> tuple[int, str, str]:
    """``run_cli`` for async tests: the in-process local DC must keep serving meanwhile."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon", *args, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def open_store(config) -> Store:
    from tgdaemon.crypto import load_keyring

    return await Store.open(config.daemon.state_dir,
                            load_keyring(key_file=config.daemon.master_key_file))


def test_keygen_writes_private_key_file_and_refuses_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    assert main(["keygen", str(path)]) == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    ring = KeyRing.loads(path.read_text())
    assert len(ring) == 1
    assert main(["keygen", str(path)]) != 0
    assert KeyRing.loads(path.read_text()) == ring


def test_check_config_ok_and_broken(make_config, tmp_path: Path) -> None:
    config = make_config([{"name": "alice"}])
    ok = run_cli("check-config", "--config", str(config.path))
    assert ok.returncode == 0, ok.stderr
    assert "ok" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text(config.path.read_text().replace('name = "alice"', 'name = "Alice!"')
                   + "\n[policy.nonsense]\n")
    result = run_cli("check-config", "--config", str(bad))
    assert result.returncode == 78
    assert "accounts[0].name" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_prints_warnings_and_still_passes(make_config) -> None:
    config = make_config([{"name": "alice"}], policy={"heartbeat_interval": 10.0,
                                                      "stale_after": 12.0})
    result = run_cli("check-config", "--config", str(config.path))
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr
    assert "policy.stale_after (12)" in result.stderr
    assert "ok" in result.stdout


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    result = run_cli("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 78
    assert "nope.toml" in result.stderr
    assert "Traceback" not in result.stderr


async def test_login_then_accounts_table(make_config, login_account, localdc, capsys) -> None:
    config = make_config([{"name": "alice", "phone": phone_for("alice")},
                          {"name": "bob", "enabled": False}])
    uid = await login_account(config, "alice")
    async with await open_store(config) as store:
        record = await store.get_account("alice")
        session = await store.load_session("alice")
    assert record is not None
    assert record.user_id == uid
    assert session is not None
    assert session.auth_key is not None
    result = run_cli("accounts", "--config", str(config.path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "USER", "STATUS", "SESSION", "LAST", "USED", "LAST",
                                "ERROR"]
    assert any(line.startswith("alice") and str(uid) in line for line in lines)
    assert any(line.startswith("bob") and "disabled" in line for line in lines)


async def test_login_with_2fa_and_wrong_code(make_config, localdc, capsys) -> None:
    from tgdaemon.cli import login as cli_login

    phone = phone_for("carol")
    localdc.set_password(phone, "correct horse")
    config = make_config([{"name": "carol", "phone": phone}])
    answers = iter(["00000", None, "wrong", "correct horse"])

    def secret(prompt: str) -> str:
        answer = next(answers)
        return localdc.last_code(phone) if answer is None else answer

    uid = await cli_login(config, "carol", prompt=lambda _p: phone, secret=secret)
    assert uid == localdc.user_id(phone)
    err = capsys.readouterr().err
    assert "code rejected" in err
    assert "wrong password" in err
    assert "correct horse" not in err


async def _telethon_logged_in(localdc, session, phone: str) -> tuple[TelegramClient, int]:
    client = make_client(localdc, 1, session)
    me = await login(client, localdc, phone)
    return client, me.id


async def test_import_string_session_and_run(make_config, localdc, wait_until) -> None:
    phone = phone_for("dave")
    client, uid = await _telethon_logged_in(localdc, StringSession(), phone)
    string = client.session.save()
    await client.disconnect()
    config = make_config([{"name": "dave", "phone": phone}])
    result = run_cli("import", "dave", "--config", str(config.path), stdin=string + "\n")
    assert result.returncode == 0, result.stderr
    assert string not in result.stdout + result.stderr
    again = run_cli("import", "dave", "--config", str(config.path), stdin=string)
    assert again.returncode != 0
    assert "--force" in again.stderr

    from tgdaemon.daemon import Daemon
    from tgdaemon.status import State

    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("dave")) is not None
                         and s.state is State.CONNECTED, 10, "imported account connected")
        status = daemon.board.get("dave")
        assert status is not None
        assert status.user is not None
        assert status.user.id == uid


async def test_import_sqlite_session_file(make_config, localdc, tmp_path: Path) -> None:
    phone = phone_for("erin")
    path = tmp_path / "erin.session"
    client, _uid = await _telethon_logged_in(localdc, SQLiteSession(str(path)), phone)
    key = client.session.auth_key.key
    await client.disconnect()
    client.session.close()
    config = make_config([{"name": "erin"}])
    result = run_cli("import", "erin", "--config", str(config.path), "--file", str(path))
    assert result.returncode == 0, result.stderr
    async with await open_store(config) as store:
        session = await store.load_session("erin")
    assert session is not None
    assert session.auth_key == key
    # the .session file itself is untouched and still a valid Telethon database
    assert sqlite3.connect(path).execute("select count(*) from sessions").fetchone()[0] == 1


def test_import_garbage_string_is_rejected_without_echo(make_config) -> None:
    config = make_config([{"name": "frank"}])
    garbage = "1NotAValidSessionString_secretish"
    result = run_cli("import", "frank", "--config", str(config.path), stdin=garbage)
    assert result.returncode != 0
    assert garbage not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


async def test_logout_logs_out_on_server_and_deletes_session(
        make_config, login_account, localdc) -> None:
    config = make_config([{"name": "gina", "phone": phone_for("gina")}])
    uid = await login_account(config, "gina")
    keys_before = localdc.auth_key_ids(user_id=uid)
    assert keys_before
    code, _out, err = await arun_cli("logout", "gina", "--config", str(config.path))
    assert code == 0, err
    assert localdc.auth_key_ids(user_id=uid) == []
    async with await open_store(config) as store:
        assert await store.load_session("gina") is None


async def test_rotate_key_reencrypts_and_keeps_old_key(
        make_config, login_account, localdc) -> None:
    config = make_config([{"name": "hank", "phone": phone_for("hank")}])
    await login_account(config, "hank")
    key_path = Path(config.daemon.master_key_file)
    old = KeyRing.loads(key_path.read_text())  # noqa: ASYNC240 - a tiny local file
    result = run_cli("rotate-key", "--config", str(config.path))
    assert result.returncode == 0, result.stderr
    new = KeyRing.loads(key_path.read_text())  # noqa: ASYNC240
    assert new.active.key_id != old.active.key_id
    assert old.active.key_id in new.key_ids
    assert stat.S_IMODE(os.stat(config.daemon.master_key_file).st_mode) == 0o600
    async with await open_store(config) as store:
        ids = await store.session_key_ids()
        assert set(ids.values()) == {new.active.key_id}
        assert (await store.load_session("hank")) is not None
    assert new.active.secret.hex() not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["login", "logout", "import"])
def test_unknown_account_is_a_clear_error(make_config, command: str) -> None:
    config = make_config([{"name": "alice"}])
    result = run_cli(command, "nobody", "--config", str(config.path), stdin="x")
    assert result.returncode != 0
    assert "nobody" in result.stderr
    assert "Traceback" not in result.stderr


async def test_status_command_prints_the_running_daemons_table(
        make_config, login_account, localdc, wait_until) -> None:
    import socket

    from tgdaemon.daemon import Daemon
    from tgdaemon.status import State

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={"http_listen": f"127.0.0.1:{port}"})
    uid = await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.state is State.CONNECTED, 10, "connected")
        code, out, err = await arun_cli("status", "--config", str(config.path))
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split() == ["NAME", "STATE", "USER", "DC", "LATENCY", "LAST", "ERROR"]
    assert row.split()[:4] == ["alice", "connected", str(uid), "1"]
    code, _out, err = await arun_cli("status", "--config", str(config.path))
    assert code != 0
    assert "not reachable" in err


async def test_cli_refuses_an_account_the_running_daemon_uses(
        make_config, login_account, localdc, wait_until) -> None:
    from tgdaemon.cli import login as cli_login
    from tgdaemon.daemon import Daemon
    from tgdaemon.exceptions import AccountError
    from tgdaemon.status import State

    config = make_config([{"name": "alice", "phone": phone_for("alice")},
                          {"name": "bob", "phone": phone_for("bob"), "enabled": False}],
                         daemon={"http_listen": ""})
    await login_account(config, "alice")
    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.state is State.CONNECTED, 10, "connected")
        assert daemon.store is not None

        async def recorded_connected() -> bool:
            record = await daemon.store.get_account("alice")
            return record is not None and record.status == "connected"

        await wait_until(recorded_connected, 5, "status recorded")
        with pytest.raises(AccountError, match="running daemon"):
            await cli_login(config, "alice", prompt=lambda _p: "", secret=lambda _p: "")
        # an account the daemon does not run can still be logged in beside it
        uid = await login_account(config, "bob")
        assert uid == localdc.user_id(phone_for("bob"))


async def test_rotate_key_while_the_daemon_runs_writes_one_new_key(
        make_config, login_account, localdc, wait_until) -> None:
    """The running daemon re-encrypts after a reload (tests/store/test_online_rotation.py);
    the CLI only writes the ring, and a second run before that reload adds no second key."""
    from tgdaemon.crypto import load_keyring
    from tgdaemon.daemon import Daemon

    config = make_config([{"name": "ivy", "phone": phone_for("ivy")}],
                         daemon={"http_listen": ""})
    await login_account(config, "ivy")
    key_path = Path(config.daemon.master_key_file)
    before = load_keyring(key_file=key_path, env={})
    async with Daemon(config):
        for _ in range(2):
            code, out, err = await arun_cli("rotate-key", "--config", str(config.path))
            assert code == 0, err
            assert "Traceback" not in err
            assert "systemctl reload tgdaemon" in out
    after = load_keyring(key_file=key_path, env={})
    assert after.active.key_id != before.active.key_id
    assert set(after.key_ids) == {before.active.key_id, after.active.key_id}
