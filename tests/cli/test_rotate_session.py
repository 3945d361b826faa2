"""``tgdaemon rotate-session``: a new auth key through the login-token flow, no login code;
the old key is logged out only after the new one is stored."""

from __future__ import annotations

import pytest
from telethon.crypto import AuthKey

from tests.conftest import phone_for
from tgdaemon.cli import rotate_session
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.exceptions import AccountError
from tgdaemon.lifecycle import State
from tgdaemon.store import Store


async def _stored(config):
    ring = load_keyring(key_file=config.daemon.master_key_file)
    async with await Store.open(config.daemon.state_dir, ring) as store:
        return await store.load_session("alice")


def _key_id(key: bytes) -> int:
    return int(AuthKey(key).key_id)  # unsigned, as localdc keys its table


def _no_secret(prompt: str) -> str:
    raise AssertionError(f"unexpected prompt {prompt!r}")


@pytest.mark.parametrize("password", [None, "hunter2"])
async def test_rotation_replaces_the_key_and_logs_the_old_one_out(
        make_config, login_account, localdc, wait_until, password):
    if password:
        localdc.set_password(phone_for("alice"), password)
    config = make_config([{"name": "alice", "phone": phone_for("alice")}])
    uid = await login_account(config, "alice", password=password)
    before = await _stored(config)
    assert before is not None
    assert before.auth_key is not None
    codes_sent = localdc.counters()["requests"].get("auth.sendCode", 0)
    prompts: list[str] = []

    def secret(prompt: str) -> str:
        prompts.append(prompt)
        assert password is not None, prompt
        return password

    user, logged_out = await rotate_session(config, "alice", secret=secret)
    assert user == uid
    assert logged_out
    assert len(prompts) == (1 if password else 0)
    assert localdc.counters()["requests"].get("auth.sendCode", 0) == codes_sent  # no code
    after = await _stored(config)
    assert after is not None
    assert after.auth_key is not None
    assert after.auth_key != before.auth_key
    assert (after.dc_id, after.user_id, after.pts) == (before.dc_id, before.user_id, before.pts)
    keys = localdc.store.auth_keys
    assert keys[_key_id(before.auth_key)].user_id is None  # the old key: logged out
    assert keys[_key_id(after.auth_key)].user_id == uid
    async with Daemon(config) as daemon:
        await wait_until(lambda: (s := daemon.board.get("alice")) is not None
                         and s.state is State.CONNECTED, 10, "connected on the new key")


async def test_rotation_needs_a_session(make_config, localdc):
    config = make_config([{"name": "alice", "phone": phone_for("alice")}])
    with pytest.raises(AccountError, match="has no session"):
        await rotate_session(config, "alice", secret=_no_secret)
