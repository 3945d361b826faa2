"""Issue 11 items 5a and 10 (the CLI's share) and issue 10 item 7 (the CLI's retries): the
real ``tgdaemon`` command against localdc with faults armed."""

from __future__ import annotations

from tests.cli.test_cli import arun_cli, open_store
from tests.conftest import phone_for
from tgdaemon.localdc.faults import Fault


async def test_logout_keeps_the_session_when_the_server_refuses(
        make_config, login_account, localdc) -> None:
    config = make_config([{"name": "gina", "phone": phone_for("gina")}])
    uid = await login_account(config, "gina")
    keys = localdc.auth_key_ids(user_id=uid)
    assert keys
    localdc.inject(Fault("rpc_error", method="auth.logOut", error="FLOOD_WAIT_30"))
    code, out, err = await arun_cli("logout", "gina", "--config", str(config.path))
    assert code == 76, (out, err)
    assert "FLOOD_WAIT" in err
    assert "kept" in err
    assert "--force" in err
    assert "Traceback" not in err
    assert localdc.auth_key_ids(user_id=uid) == keys  # still logged in on the server ...
    async with await open_store(config) as store:
        data = await store.load_session("gina")  # ... and the key to it is still here
    assert data is not None
    assert data.auth_key is not None

    # --force deletes locally and says what that means; the server login stays.
    code, out, err = await arun_cli("logout", "gina", "--force", "--config", str(config.path))
    assert code == 0, err
    assert "WITHOUT a confirmed server logout" in out
    assert localdc.auth_key_ids(user_id=uid) == keys
    async with await open_store(config) as store:
        assert await store.load_session("gina") is None


async def test_logout_retries_a_stalled_request_then_succeeds(
        make_config, login_account, localdc) -> None:
    """``backoff`` at work: two unanswered tries time out, the third logs out."""
    config = make_config([{"name": "hal", "phone": phone_for("hal")}],
                         policy={"request_timeout": 1.0})
    uid = await login_account(config, "hal")
    localdc.inject(Fault("stall", method="auth.logOut", times=2))
    code, out, err = await arun_cli("logout", "hal", "--config", str(config.path))
    assert code == 0, (out, err)
    assert err.count("retrying in") == 2, err
    assert localdc.counters(user_id=uid)["requests"]["auth.logOut"] == 3
    assert localdc.auth_key_ids(user_id=uid) == []


async def test_login_against_a_stalled_send_code_ends_with_one_line(
        make_config, localdc) -> None:
    config = make_config([{"name": "ida", "phone": phone_for("ida")}],
                         policy={"request_timeout": 1.0, "backoff_base": 0.05,
                                 "backoff_cap": 0.1})
    localdc.inject(Fault("stall", method="auth.sendCode"))
    code, out, err = await arun_cli("login", "ida", "--config", str(config.path))
    assert code == 69, (out, err)
    lines = [line for line in err.splitlines() if line.startswith("tgdaemon: error")]
    assert lines == ["tgdaemon: error: Telegram did not answer auth.sendCode within 1 s"], err
    assert localdc.counters()["stalled"] == 3  # first try and two retries
    assert "Traceback" not in err


async def test_login_errors_are_one_line_each(make_config, localdc) -> None:
    config = make_config([{"name": "jay"}])
    # end of input at the phone prompt
    code, _out, err = await arun_cli("login", "jay", "--config", str(config.path))
    assert code == 66, err
    assert "end of input" in err
    assert "Traceback" not in err
    # not a phone number at all: refused before anything is sent, without echoing it
    code, _out, err = await arun_cli("login", "jay", "--config", str(config.path),
                                     stdin="my phone\n")
    assert code == 65, err
    assert "not a phone number" in err
    assert "my phone" not in err
    assert "Traceback" not in err
    # an invalid phone number: Telegram's refusal, not a traceback
    localdc.inject(Fault("rpc_error", method="auth.sendCode", error="PHONE_NUMBER_INVALID"))
    code, _out, err = await arun_cli("login", "jay", "--config", str(config.path),
                                     stdin="+0\n")
    assert code == 76, err
    assert "PHONE_NUMBER_INVALID" in err
    assert "Traceback" not in err
    # a refusing DC
    localdc.inject(Fault("refuse"))
    code, _out, err = await arun_cli("login", "jay", "--config", str(config.path),
                                     stdin=phone_for("jay") + "\n")
    assert code == 69, err
    assert "cannot reach Telegram for connect" in err
    assert "Traceback" not in err


async def test_logout_against_a_refusing_dc_keeps_the_session(
        make_config, login_account, localdc) -> None:
    config = make_config([{"name": "kim", "phone": phone_for("kim")}],
                         policy={"backoff_base": 0.05, "backoff_cap": 0.1})
    await login_account(config, "kim")
    localdc.inject(Fault("refuse"))
    code, _out, err = await arun_cli("logout", "kim", "--config", str(config.path))
    assert code == 69, err
    assert "cannot reach Telegram for connect" in err
    assert "the local session was kept" in err
    assert "Traceback" not in err, err
    async with await open_store(config) as store:
        assert await store.load_session("kim") is not None


async def test_import_of_a_session_file_with_null_or_text_columns(make_config, tmp_path) -> None:
    import sqlite3

    config = make_config([{"name": "lee"}])
    for column, value in (("port", None), ("auth_key", "k" * 256),
                          ("server_address", None)):
        path = tmp_path / f"{column}.session"
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE sessions (dc_id INTEGER PRIMARY KEY, server_address TEXT, "
                       "port INTEGER, auth_key BLOB, takeout_id INTEGER)")
            row = {"dc_id": 2, "server_address": "127.0.0.1", "port": 443,
                   "auth_key": bytes(range(256)), column: value}
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, NULL)",
                       (row["dc_id"], row["server_address"], row["port"], row["auth_key"]))
        code, _out, err = await arun_cli("import", "lee", "--file", str(path),
                                         "--config", str(config.path))
        assert code == 65, err
        assert f"sessions.{column} is" in err
        assert "Traceback" not in err
        assert "kkkk" not in err
