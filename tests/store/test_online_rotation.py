"""``tgdaemon rotate-key`` while the daemon runs: the CLI writes the new ring, a reload hands
it to the daemon, which re-encrypts every record in the background; no account disconnects."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import phone_for
from tests.daemon.test_process import daemon_env
from tgdaemon.crypto import load_keyring
from tgdaemon.daemon import Daemon
from tgdaemon.lifecycle import State
from tgdaemon.store import DeviceInfo, SessionData, Store

EXTRA = 400  # stored sessions of accounts outside this config: re-encrypted all the same


def _connections(localdc, uid: int) -> int:
    return int(localdc.counters(user_id=uid)["connections"])


async def test_rotate_key_while_running(make_config, login_account, localdc, wait_until):
    names = ("alice", "bob")
    config = make_config([{"name": n, "phone": phone_for(n)} for n in names],
                         policy={"heartbeat_interval": 0.3})
    ids = {n: await login_account(config, n) for n in names}
    key_file = config.daemon.master_key_file
    assert key_file is not None
    old = load_keyring(key_file=key_file, env={})
    async with await Store.open(config.daemon.state_dir, old) as store:
        for i in range(EXTRA):
            name = f"extra{i:03d}"
            await store.ensure_account(name, DeviceInfo("x", "y", "z"))
            await store.save_session(name, SessionData(2, "1.2.3.4", 443, os.urandom(256)))
    async with Daemon(config, env={}) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 2, 15, "connected")
        before = {n: _connections(localdc, uid) for n, uid in ids.items()}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tgdaemon", "rotate-key", "-c", str(config.path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env())
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert "re-encrypts every session in the background" in out.decode()
        new = load_keyring(key_file=key_file, env={})
        assert new.active.key_id != old.active.key_id
        assert old.active.key_id in new.key_ids
        assert await daemon.reload()
        assert daemon.store is not None
        store = daemon.store

        async def all_new() -> bool:
            used = set((await store.session_key_ids()).values())
            return used == {new.active.key_id}

        await wait_until(all_new, 60, "every record under the new key")
        assert daemon.rotation is not None
        await wait_until(lambda: not daemon.rotation.running, 10, "rotation task done")
        assert daemon.registry.get_sample_value("tgdaemon_key_rotation_pending_records") == 0
        assert "re-encrypting" not in daemon.summary()
        # nobody reconnected, and the workers' own writes use the new key
        assert {n: _connections(localdc, uid) for n, uid in ids.items()} == before
        assert daemon.board.counts()[State.CONNECTED] == 2
        loaded = await store.load_sessions()
        assert all(isinstance(v, SessionData) for v in loaded.values())
        assert len(loaded) == EXTRA + 2
