"""Helpers shared by the store tests (a plain module: conftest is not importable safely)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from pathlib import Path

from tgdaemon.crypto import KeyRing
from tgdaemon.exceptions import StoreError
from tgdaemon.leasestore import NO_EPOCH, LeaseStore, PgLeaseStore
from tgdaemon.store import DB_NAME, SessionData, Store


def make_session(seq: int = 0, *, dc_id: int = 2, user_id: int | None = None) -> SessionData:
    return SessionData(
        dc_id=dc_id, server_address="149.154.167.51", port=443, auth_key=os.urandom(256),
        user_id=user_id, pts=seq, qts=0, date=1_700_000_000, seq=seq,
    )


class LeaseRoute:
    """The fleet's session route (tgdaemon/fleet.py ``Fleet.write_records``) for store tests:
    records live in a lease store, every write fenced by the epoch of a lease this instance
    holds.  Accounts it writes are added to the fleet and claimed first (one instance)."""

    def __init__(self, leases: LeaseStore, instance: str = "store-test") -> None:
        self.leases = leases
        self.instance = instance
        self.epochs: dict[str, int] = {}

    async def own(self, names: Iterable[str]) -> None:
        missing = [n for n in names if n not in self.epochs]
        if not missing:
            return
        await self.leases.register(self.instance, 1_000_000)
        await self.leases.sync_accounts(dict.fromkeys(missing, True))
        # a restarted instance keeps what it held (renew), then takes what is free
        self.epochs.update(await self.leases.renew(self.instance, LEASE_TTL))
        self.epochs.update(await self.leases.claim(self.instance, len(missing), LEASE_TTL))

    async def write_records(self, records: Mapping[str, bytes | None]
                            ) -> dict[str, BaseException]:
        await self.own(records)
        writes = {n: (self.epochs.get(n, NO_EPOCH), r) for n, r in records.items()}
        rejected = await self.leases.write_sessions(self.instance, writes)
        return {n: StoreError(f"session of {n!r} not written: lease lost") for n in rejected}

    async def read_records(self, names: Sequence[str] | None) -> dict[str, bytes]:
        return await self.leases.read_sessions(names)


#: Long enough that no lease of a store test expires while it runs.
LEASE_TTL = 3600.0


class SessionBackend:
    """Where a test's session records live: the state database (SQLite, ``url`` empty) or a
    PostgreSQL fleet database through :class:`LeaseRoute`; raw records read and written
    behind the store's back (tamper tests)."""

    def __init__(self, state_dir: Path, url: str = "") -> None:
        self.state_dir = state_dir
        self.url = url
        self.kind = "postgresql" if url else "sqlite"

    @contextlib.asynccontextmanager
    async def open(self, ring: KeyRing) -> AsyncIterator[Store]:
        store = await Store.open(self.state_dir, ring)
        leases = await PgLeaseStore.open(self.url) if self.url else None
        try:
            if leases is not None:
                store.route_sessions(LeaseRoute(leases))
            yield store
        finally:
            await store.close()
            if leases is not None:
                await leases.close()

    async def raw(self) -> dict[str, bytes]:
        """Every stored record, as stored."""
        if not self.url:
            with contextlib.closing(sqlite3.connect(self.state_dir / DB_NAME)) as db:
                return dict(db.execute("SELECT account, record FROM sessions").fetchall())
        leases = await PgLeaseStore.open(self.url)
        try:
            return await leases.read_sessions()
        finally:
            await leases.close()

    async def put_raw(self, name: str, record: bytes) -> None:
        if not self.url:
            with contextlib.closing(sqlite3.connect(self.state_dir / DB_NAME)) as db, db:
                db.execute("UPDATE sessions SET record=? WHERE account=?", (record, name))
            return
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute("UPDATE sessions SET record=$1 WHERE account=$2", record, name)
        finally:
            await conn.close()
