"""The CLI's fleet commands: ``tgdaemon accounts add|remove|enable|disable NAME...`` and
``tgdaemon cluster status|forget``.  They edit and read the lease store the daemons share
(README: Scaling out); running daemons pick the changes up at their next renewal.  Also the
fleet's side of ``rotate-key``/``prune-keys``: the records they check are the fleet's."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import TYPE_CHECKING

from tgdaemon.exceptions import AccountError, ConfigError

if TYPE_CHECKING:
    from tgdaemon.config import Config
    from tgdaemon.crypto import KeyRing
    from tgdaemon.leasestore import InstanceInfo, LeaseStore, Reencrypt
    from tgdaemon.records import RecordReport
    from tgdaemon.store import Store

ACTIONS = ("add", "remove", "enable", "disable")


def _require_fleet(config: Config, what: str) -> None:
    if not config.daemon.clustered:
        raise ConfigError(
            f"{config.path}: {what} needs a fleet (daemon.instance_id or $TGDAEMON_INSTANCE); "
            "a single daemon takes its accounts from [[accounts]]")


@contextlib.asynccontextmanager
async def open_fleet(config: Config) -> AsyncIterator[LeaseStore]:
    """The fleet's lease store; for SQLite the state database is opened (and migrated) first,
    without taking any daemon's lock."""
    from tgdaemon.crypto import load_keyring
    from tgdaemon.leasestore import open_lease_store
    from tgdaemon.store import Store

    path = config.daemon.state_dir / "tgdaemon.sqlite3"
    if not config.daemon.database_url:
        ring = load_keyring(key_file=config.daemon.master_key_file)
        store = await Store.open(config.daemon.state_dir, ring, lock=False)
        path = store.path
        await store.close()
    leases = await open_lease_store(config.daemon.database_url, path, config.daemon.lease_ttl)
    try:
        yield leases
    finally:
        await leases.close()


class FleetRecords:
    """The fleet's shared session records as a store's route, for reading and re-encrypting
    only (a session write needs a lease: tgdaemon/fleet.py)."""

    def __init__(self, leases: LeaseStore) -> None:
        self.leases = leases

    async def write_records(self, records: Mapping[str, bytes | None]
                            ) -> dict[str, BaseException]:
        return {n: AccountError(f"session of {n!r} not written: the fleet's records are "
                                "written by the instance holding the account's lease")
                for n in records}

    async def read_records(self, names: Sequence[str] | None) -> dict[str, bytes]:
        return await self.leases.read_sessions(names)

    async def reencrypt_records(self, old_key_ids: Sequence[str], limit: int,
                                skip: Sequence[str], convert: Reencrypt) -> tuple[int, int]:
        return await self.leases.reencrypt(old_key_ids, limit, skip, convert)


@contextlib.asynccontextmanager
async def fleet_records(config: Config, ring: KeyRing
                        ) -> AsyncIterator[tuple[Store, LeaseStore, RecordReport]]:
    """A store reading the fleet's records, the lease store, and how those records fare
    against ``ring`` (a problem is printed, as for a single daemon's records)."""
    from tgdaemon.leasestore import open_lease_store
    from tgdaemon.records import check_records
    from tgdaemon.store import Store

    async with await Store.open(config.daemon.state_dir, ring, lock=False) as store:
        leases = await open_lease_store(config.daemon.database_url, store.path,
                                        config.daemon.lease_ttl)
        try:
            store.route_sessions(FleetRecords(leases))
            report = await check_records(store)
            problem = report.problem()
            if problem is not None:
                print(f"tgdaemon: warning: {problem}", file=sys.stderr)
            yield store, leases, report
        finally:
            await leases.close()


async def keys_in_use(leases: LeaseStore, report: RecordReport) -> dict[str, str]:
    """Key id -> why it must stay in every instance's ring: records under it, or a registered
    instance writing under it (a live one that lacks the new key, or a lost one that could
    come back; ``cluster forget`` removes those)."""
    why = {k: f"{n} record(s)" for k, n in report.key_use.items()}
    for i in await leases.instances():
        if not i.key_ids:
            raise AccountError(f"instance {i.id} has not published its key ring (starting, or "
                               "an older tgdaemon): not pruning; retry when it runs")
        if i.write_key is not None:
            why.setdefault(i.write_key, f"instance {i.id} writes under it")
    return why


async def edit_accounts(config: Config, action: str, names: Sequence[str]) -> str:
    """Apply ``action`` to ``names``; returns the line to print."""
    from tgdaemon.config import NAME_RE

    _require_fleet(config, f"accounts {action}")
    if not names:
        raise AccountError(f"accounts {action}: name at least one account")
    bad = [n for n in names if not NAME_RE.fullmatch(n)]
    if bad:
        raise AccountError(f"account names must match {NAME_RE.pattern}: {bad[0]!r}")
    async with open_fleet(config) as leases:
        if action == "add":
            added = await leases.sync_accounts(dict.fromkeys(names, True))
            return f"added {added} account(s) ({len(names) - added} already in the fleet)"
        missing = []
        for name in names:
            ok = (await leases.remove_account(name) if action == "remove"
                  else await leases.set_enabled(name, action == "enable"))
            if not ok:
                missing.append(name)
        if missing:
            raise AccountError(f"no account named {missing[0]!r} in the fleet")
    done = {"remove": "removed", "enable": "enabled", "disable": "disabled"}[action]
    return f"{done} {len(names)} account(s); owners apply it at their next renewal"


async def fleet_accounts(config: Config) -> list[list[str]]:
    """Rows of ``tgdaemon accounts`` in fleet mode: name, enabled, owner, lease left."""
    async with open_fleet(config) as leases:
        fleet = await leases.fleet()
    rows = []
    for a in fleet:
        left = a.expires_in if a.owner is not None and a.expires_in is not None else 0.0
        rows.append([a.name, "yes" if a.enabled else "no",
                     a.owner if a.owner is not None and left > 0 else "-",
                     f"{left:.0f}s" if left > 0 else "-", str(a.epoch)])
    return rows


async def cluster_status(config: Config) -> str:
    """``tgdaemon cluster status``: instances, last renewal, accounts owned, lag."""
    _require_fleet(config, "cluster status")
    ttl = config.daemon.lease_ttl
    async with open_fleet(config) as leases:
        instances = await leases.instances()
        counts = await leases.counts(ttl)
    rows = [[i.id, i.host, str(i.pid), str(i.capacity), str(i.owned),
             f"{i.renewed_ago:.1f}s ago", "live" if i.renewed_ago < ttl else "LOST",
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(i.started_at)), _keys(i)]
            for i in instances]
    from tgdaemon.cli import _table

    table = _table(["INSTANCE", "HOST", "PID", "CAPACITY", "OWNED", "LAST RENEWAL", "STATE",
                    "STARTED", "KEYS"], rows)
    return (f"{table}\nfleet: {counts.accounts} enabled account(s), {counts.claimable} "
            f"without a valid lease; {counts.live_instances} instance(s) live, "
            f"{counts.lost_instances} lost (lease_ttl {ttl:g}s)")


async def forget_instance(config: Config, instance: str, *, force: bool) -> str:
    """``tgdaemon cluster forget INSTANCE [--force]``; returns the line to print."""
    from tgdaemon.exceptions import InstanceLiveError

    _require_fleet(config, "cluster forget")
    ttl = config.daemon.lease_ttl
    _refuse_if_running_here(config, instance)
    async with open_fleet(config) as leases:
        result = await leases.forget(instance, ttl, force=force)
    if result is None:
        raise AccountError(f"no instance named {instance!r} in the fleet (tgdaemon cluster "
                           "status lists them)")
    if not result.forgotten:
        raise InstanceLiveError(
            f"instance {instance} renewed its leases {result.renewed_ago:.1f}s ago, within "
            f"lease_ttl ({ttl:g}s): it may still be running, and its accounts would run twice; "
            "stop it or wait until it is LOST, or pass --force if you know it is dead")
    return (f"forgot instance {instance} (last renewal {result.renewed_ago:.1f}s ago): "
            f"released {result.released} lease(s); the live instances claim its accounts at "
            "their next renewal")


def _refuse_if_running_here(config: Config, instance: str) -> None:
    """Even with ``--force``: an instance of this state directory whose lock is held runs
    (or is paused) on this machine; it must be stopped, not forgotten."""
    import fcntl
    import os

    from tgdaemon.exceptions import InstanceLiveError
    from tgdaemon.fleet import instance_lock_name

    try:
        fd = os.open(config.daemon.state_dir / instance_lock_name(instance),
                     os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # never ran here
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            raise InstanceLiveError(
                f"instance {instance} runs on this machine (pid {pid} holds "
                f"{instance_lock_name(instance)}): stop it (systemctl stop "
                f"tgdaemon@{instance}) instead of forgetting it") from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _keys(i: InstanceInfo) -> str:
    """The key ids of the instance's ring, ``*`` on the one it writes under."""
    if not i.key_ids:
        return "-"
    return ",".join(k + ("*" if k == i.write_key else "") for k in i.key_ids)
