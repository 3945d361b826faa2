"""``tgdaemon rotate-key`` in a fleet (README: Rotating the master key of a fleet): two
daemons share the records; the new key is used only once both hold it, then every record is
re-encrypted once, readable by both, with no account reconnecting.  Both backends."""

from __future__ import annotations

from pathlib import Path

from tests.fleet.conftest import as_instance, connected, logged_in_fleet
from tests.fleet.test_cluster_cli import cli
from tgdaemon.crypto import load_keyring, record_key_id
from tgdaemon.daemon import Daemon
from tgdaemon.leasestore import open_lease_store
from tgdaemon.store import DB_NAME, SESSION_PURPOSE, SessionData, Store

NAMES = ["acc0", "acc1", "acc2", "acc3"]
EXTRA = 300  # disabled accounts' records: only the re-encryption touches them


async def test_fleet_rotates_once_every_instance_holds_the_key(
        make_config, login_account, localdc, wait_until, fleet_settings) -> None:
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**fleet_settings, "instance_id": "one"})
    key_file = config.daemon.master_key_file
    assert key_file is not None
    old = load_keyring(key_file=key_file, env={})
    state: Path = config.daemon.state_dir
    url = config.daemon.database_url
    extra = {f"x{i:03d}": old.encrypt(SessionData(2, "1.2.3.4", 443, bytes([i % 250 + 1]) * 256)
                                      .to_bytes(), account=f"x{i:03d}", purpose=SESSION_PURPOSE)
             for i in range(EXTRA)}
    leases = await open_lease_store(url, state / DB_NAME)
    try:
        await leases.sync_accounts(dict.fromkeys(extra, False))
        if url:
            await leases.seed_sessions(extra)
        else:
            async with await Store.open(state, old, lock=False) as local:
                for name in extra:  # the SQLite fleet's records are this database's
                    await local.save_session(name, SessionData.from_bytes(old.decrypt(
                        extra[name], account=name, purpose=SESSION_PURPOSE)))

        async def key_use() -> dict[str | None, int]:
            use: dict[str | None, int] = {}
            for record in (await leases.read_sessions()).values():
                use[record_key_id(record)] = use.get(record_key_id(record), 0) + 1
            return use

        async def published() -> dict[str, tuple[tuple[str, ...], str | None]]:
            return {i.id: (i.key_ids, i.write_key) for i in await leases.instances()}

        total = EXTRA + len(NAMES)
        async with Daemon(config, env={}) as one, \
                Daemon(as_instance(config, "two"), env={}) as two:
            await wait_until(lambda: connected(one, two) == NAMES, 30, "all connected once")
            before = localdc.counters()["connections"]
            assert await key_use() == {old.active.key_id: total}

            rc, out, err = await cli(config.path, "rotate-key")
            assert rc == 0, err
            assert "install this ring on every instance" in out
            new = load_keyring(key_file=key_file, env={})
            assert new.key_ids[1:] == old.key_ids
            assert await one.reload()
            assert one.fleet_keys is not None
            assert two.fleet_keys is not None

            async def one_published() -> bool:
                return (await published())["one"] == (new.key_ids, old.active.key_id)

            await wait_until(one_published, 20, "one publishes the new ring")
            for _ in range(3):  # agreements later, nothing is under the new key yet
                n = one.fleet_keys.agreements
                await wait_until(lambda n=n: one.fleet_keys.agreements > n, 10, "agreement")
            assert one.fleet_keys.write_key == old.active.key_id
            assert await key_use() == {old.active.key_id: total}
            rc, out, err = await cli(config.path, "prune-keys")
            assert rc == 0, err
            assert f"{old.active.key_id}: {total} record(s)" in out
            assert "nothing pruned" in out

            assert await two.reload()

            async def all_new() -> bool:
                return await key_use() == {new.active.key_id: total}

            await wait_until(all_new, 60, "every record under the new key")
            for d in (one, two):
                assert d.rotation is not None
                assert d.fleet_keys is not None
                # its own pass after switching (finds nothing left, or what is left)
                await wait_until(lambda d=d: d.fleet_keys.write_key == new.active.key_id
                                 and d.rotation.pending == 0 and not d.rotation.running, 20,
                                 "switched and done")
                assert d.registry.get_sample_value(
                    "tgdaemon_key_rotation_pending_records") == 0

            async def both_published() -> bool:
                return await published() == dict.fromkeys(
                    ("one", "two"), (new.key_ids, new.active.key_id))

            await wait_until(both_published, 10, "both publish the new write key")
            # each record rewritten at most once (the workers' own writes count for the rest)
            assert one.rotation is not None
            assert two.rotation is not None
            done = one.rotation.reencrypted + two.rotation.reencrypted
            assert EXTRA <= done <= total
            for d in (one, two):
                assert d.store is not None
                loaded = await d.store.load_sessions()
                assert len(loaded) == total
                assert all(isinstance(v, SessionData) for v in loaded.values())
            assert localdc.counters()["connections"] == before, "an account reconnected"
            assert connected(one, two) == NAMES
            rc, out, err = await cli(config.path, "cluster", "status")
            assert rc == 0, err
            keys = {line.split()[0]: line.split()[-1] for line in out.splitlines()[1:3]}
            assert keys == dict.fromkeys(("one", "two"),
                                         f"{new.active.key_id}*,{old.active.key_id}")
            # an instance forgotten while it runs registers and publishes its ring again
            assert await leases.forget("two", 3600, force=True) is not None

            async def two_back() -> bool:
                return (await published()).get("two") == (new.key_ids, new.active.key_id)

            await wait_until(two_back, 20, "two registered and published again")
            rc, out, err = await cli(config.path, "prune-keys")
            assert rc == 0, err
            assert f"removed key(s) {old.active.key_id}" in out
            assert load_keyring(key_file=key_file, env={}).key_ids == (new.active.key_id,)
    finally:
        await leases.close()
