"""``tgdaemon accounts add|remove|enable|disable`` and ``tgdaemon cluster status``, run as
the real command next to a fleet daemon, on both backends."""

from __future__ import annotations

import asyncio
import os
import sys

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon


async def cli(config_path, *args: str, instance: str | None = "ops") -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TGDAEMON_INSTANCE"}
    if instance:
        env["TGDAEMON_INSTANCE"] = instance
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon", *args, "-c", str(config_path), env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_accounts_and_cluster_status(make_config, login_account, wait_until,
                                           fleet_settings) -> None:
    plain = make_config([{"name": "alice", "phone": phone_for("alice")}])
    await login_account(plain, "alice")
    rc, out, err = await cli(plain.path, "accounts", "add", "dave", instance=None)
    assert rc == 78, err  # a single daemon has no fleet to edit
    assert "daemon.instance_id" in err
    assert err.count("\n") == 1
    config = make_config([{"name": "alice", "phone": phone_for("alice")}],
                         daemon={**fleet_settings, "instance_id": "one"})
    path = config.path

    rc, out, err = await cli(path, "accounts", "add", "bob", "carol")
    assert (rc, err) == (0, "")
    assert "added 2 account(s)" in out
    rc, out, err = await cli(path, "accounts", "disable", "carol")
    assert rc == 0, err
    rc, out, err = await cli(path, "accounts", "remove", "nobody")
    assert rc == 67
    assert err.count("\n") == 1
    assert "nobody" in err

    async with Daemon(config) as daemon:
        assert daemon.fleet is not None
        # alice (from the config) and bob (added) run; carol is disabled
        await wait_until(lambda: daemon.fleet.owned == {"alice", "bob"}, 20, "two leases")
        rc, out, err = await cli(path, "cluster", "status")
        assert rc == 0, err
        lines = out.splitlines()
        assert lines[0].split()[:5] == ["INSTANCE", "HOST", "PID", "CAPACITY", "OWNED"]
        row = lines[1].split()
        assert (row[0], row[2], row[4]) == ("one", str(os.getpid()), "2")
        assert "live" in row
        assert "2 enabled account(s), 0 without a valid lease; 1 instance(s) live, 0 lost" \
            in lines[-1]
        rc, out, err = await cli(path, "accounts")
        assert rc == 0, err
        table = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
        assert table == {"alice": ["yes", "one"], "bob": ["yes", "one"], "carol": ["no", "-"]}
        rc, out, err = await cli(path, "accounts", "disable", "bob")
        assert rc == 0, err
        await wait_until(lambda: daemon.fleet.owned == {"alice"}, 20, "bob released")
