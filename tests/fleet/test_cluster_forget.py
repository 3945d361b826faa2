"""``tgdaemon cluster forget INSTANCE``: a dead instance's row and leases removed so its
accounts run elsewhere at once instead of after the TTL; refused while it may be running;
its stale writes stay fenced and, should it come back, it starts from nothing.  Both
backends: the lease store's side, then the real command next to a running daemon."""

from __future__ import annotations

import os

from tests.fleet.conftest import connected, logged_in_fleet
from tests.fleet.test_cluster_cli import cli
from tgdaemon.daemon import Daemon
from tgdaemon.leasestore import open_lease_store
from tgdaemon.store import DB_NAME

NAMES = ["acc0", "acc1", "acc2"]
#: Long enough that nothing in this test lapses by itself: what frees the accounts is forget.
TTL = 30.0


async def test_forget_frees_a_dead_instances_accounts_at_once(
        make_config, login_account, wait_until, fleet_settings) -> None:
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**fleet_settings, "lease_ttl": TTL, "instance_id": "one"})
    state = config.daemon.state_dir
    async with Daemon(config) as one:  # creates the store and the fleet's accounts
        assert one.fleet is not None
        await wait_until(lambda: connected(one) == NAMES, 30, "one runs all")
    leases = await open_lease_store(config.daemon.database_url, state / DB_NAME)
    try:
        # "ghost" holds every account and then dies (no clean stop: its leases stay)
        await leases.register("ghost", 100)
        ghost = await leases.claim("ghost", 10, TTL)
        assert sorted(ghost) == NAMES
        path = config.path
        async with Daemon(config) as one:
            assert one.fleet is not None
            rc, out, err = await cli(path, "cluster", "forget", "ghost")
            assert rc == 75, err  # renewed within the TTL: it may be running
            assert err.count("\n") == 1
            assert "--force" in err
            assert "ghost" in err
            rc, out, err = await cli(path, "cluster", "forget", "nobody", "--force")
            assert rc == 67
            assert err.count("\n") == 1
            # an instance that runs on this machine is refused even with --force
            rc, out, err = await cli(path, "cluster", "forget", "one", "--force")
            assert rc == 75, err
            assert f"pid {os.getpid()}" in err
            assert one.fleet.owned == frozenset()  # still the ghost's

            rc, out, err = await cli(path, "cluster", "forget", "ghost", "--force")
            assert rc == 0, err
            assert f"released {len(NAMES)} lease(s)" in out
            # well within the ghost's lease TTL: the accounts run on the live instance
            await wait_until(lambda: connected(one) == NAMES, TTL / 2, "one takes over")
            rc, out, err = await cli(path, "cluster", "status")
            assert rc == 0, err
            rows = [line.split()[0] for line in out.splitlines()[1:-1]]
            assert rows == ["one"]
            assert "1 instance(s) live, 0 lost" in out

            # fencing: the ghost's writes under its old epochs are refused ...
            assert await leases.write_sessions(
                "ghost", {n: (e, b"stale") for n, e in ghost.items()}) == set(NAMES)
            # ... and if it comes back, it holds nothing and is registered again
            assert await leases.renew("ghost", TTL) == {}
            assert {i.id for i in await leases.instances()} == {"ghost", "one"}
            assert {a.owner for a in await leases.fleet()} == {"one"}
    finally:
        await leases.close()


async def test_forget_a_lost_instance_without_force(make_config, wait_until,
                                                    fleet_settings) -> None:
    config = make_config([], daemon={**fleet_settings, "lease_ttl": TTL, "instance_id": "one"})
    async with Daemon(config):
        pass  # the store exists
    leases = await open_lease_store(config.daemon.database_url,
                                    config.daemon.state_dir / DB_NAME)
    try:
        await leases.sync_accounts({"a": True})
        await leases.register("gone", 10)
        assert await leases.claim("gone", 1, 0.2) == {"a": 1}
        assert await leases.forget("nobody", 0.2, force=False) is None
        # lost: not renewed for longer than the TTL given
        async def lost() -> bool:
            return (await leases.counts(0.2)).lost_instances == 1

        await wait_until(lost, 10, "gone is lost")
        result = await leases.forget("gone", 0.2, force=False)
        assert result is not None
        assert result.forgotten
        assert result.released == 1
        assert result.renewed_ago >= 0.2
        assert await leases.instances() == []
        assert (await leases.counts(0.2)).lost_instances == 0
        assert await leases.write_sessions("gone", {"a": (1, b"x")}) == {"a"}
        assert await leases.claim("other", 1, TTL) == {"a": 2}
    finally:
        await leases.close()
