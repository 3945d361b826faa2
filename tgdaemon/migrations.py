"""Numbered, append-only schema migrations for the state database.

Rules: never edit or reorder a released migration, only append a new one.  Each migration runs
in its own ``BEGIN IMMEDIATE`` transaction together with the ``user_version`` bump and its row
in ``schema_migrations``, so a crash leaves the schema either before or after it.  The SHA-256
of each applied migration is recorded and checked at start-up, which turns an edited migration
into a clear error instead of a silently diverging schema.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]

    @property
    def checksum(self) -> str:
        h = hashlib.sha256(self.description.encode())
        for s in self.statements:
            h.update(b"\x00" + " ".join(s.split()).encode())
        return h.hexdigest()


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "accounts, encrypted sessions, DC address cache",
        (
            """CREATE TABLE schema_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                checksum TEXT NOT NULL,
                applied_at REAL NOT NULL
            )""",
            """CREATE TABLE accounts (
                name TEXT PRIMARY KEY,
                user_id INTEGER,
                username TEXT,
                first_name TEXT,
                status TEXT NOT NULL DEFAULT 'new',
                created_at REAL NOT NULL,
                last_used REAL,
                last_checked REAL,
                device_model TEXT,
                system_version TEXT,
                app_version TEXT,
                dc_id INTEGER,
                last_error_category TEXT
            ) WITHOUT ROWID""",
            """CREATE TABLE sessions (
                account TEXT PRIMARY KEY REFERENCES accounts(name) ON DELETE CASCADE,
                record BLOB NOT NULL,
                updated_at REAL NOT NULL
            ) WITHOUT ROWID""",
            """CREATE TABLE dc_addresses (
                dc_id INTEGER NOT NULL,
                position INTEGER NOT NULL,
                address TEXT NOT NULL,
                port INTEGER NOT NULL,
                updated_at REAL NOT NULL,
                PRIMARY KEY (dc_id, position)
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        2,
        "fleet: enabled flag, one lease row per account, instances",
        (
            "ALTER TABLE accounts ADD COLUMN enabled INTEGER NOT NULL DEFAULT 1",
            """CREATE TABLE leases (
                account TEXT PRIMARY KEY REFERENCES accounts(name) ON DELETE CASCADE,
                owner TEXT,
                epoch INTEGER NOT NULL DEFAULT 0,
                expires_at REAL NOT NULL DEFAULT 0
            ) WITHOUT ROWID""",
            "CREATE INDEX leases_owner ON leases(owner)",
            "INSERT INTO leases (account) SELECT name FROM accounts",
            """CREATE TRIGGER accounts_lease AFTER INSERT ON accounts BEGIN
                INSERT OR IGNORE INTO leases (account) VALUES (NEW.name);
            END""",
            """CREATE TABLE instances (
                id TEXT PRIMARY KEY,
                capacity INTEGER NOT NULL,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                started_at REAL NOT NULL,
                renewed_at REAL NOT NULL
            ) WITHOUT ROWID""",
        ),
    ),
    Migration(
        3,
        "fleet: the key ids each instance holds and the key it writes under",
        (
            "ALTER TABLE instances ADD COLUMN key_ids TEXT",
            "ALTER TABLE instances ADD COLUMN write_key TEXT",
        ),
    ),
)

LATEST = MIGRATIONS[-1].version

#: The same schema for PostgreSQL (tgdaemon/leasestore.py): the fleet's accounts, leases,
#: instances and encrypted sessions.  Numbered and checksummed like the SQLite ones.
PG_MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "fleet: accounts, leases, instances, encrypted sessions",
        (
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY,
                description TEXT NOT NULL,
                checksum TEXT NOT NULL,
                applied_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE accounts (
                name TEXT PRIMARY KEY,
                enabled BOOLEAN NOT NULL DEFAULT TRUE,
                created_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE leases (
                account TEXT PRIMARY KEY REFERENCES accounts(name) ON DELETE CASCADE,
                owner TEXT,
                epoch BIGINT NOT NULL DEFAULT 0,
                expires_at DOUBLE PRECISION NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX leases_owner ON leases(owner)",
            """CREATE TABLE instances (
                id TEXT PRIMARY KEY,
                capacity INTEGER NOT NULL,
                host TEXT NOT NULL,
                pid INTEGER NOT NULL,
                started_at DOUBLE PRECISION NOT NULL,
                renewed_at DOUBLE PRECISION NOT NULL
            )""",
            """CREATE TABLE sessions (
                account TEXT PRIMARY KEY REFERENCES accounts(name) ON DELETE CASCADE,
                record BYTEA NOT NULL,
                updated_at DOUBLE PRECISION NOT NULL
            )""",
        ),
    ),
    Migration(
        2,
        "fleet: the key ids each instance holds and the key it writes under",
        (
            "ALTER TABLE instances ADD COLUMN key_ids TEXT",
            "ALTER TABLE instances ADD COLUMN write_key TEXT",
        ),
    ),
)


def unapplied(applied: dict[int, str], migrations: tuple[Migration, ...],
              where: str) -> tuple[Migration, ...]:
    """The migrations still to run after checking the applied ones against their checksums;
    raises ValueError (with ``where`` named) for an edited migration or a newer schema."""
    latest = migrations[-1].version
    for version, checksum in sorted(applied.items()):
        if version > latest:
            raise ValueError(f"{where} has schema version {version}, newer than this tgdaemon "
                             f"supports ({latest}); upgrade tgdaemon")
        if migrations[version - 1].checksum != checksum:
            raise ValueError(f"{where}: migration {version} differs from the one applied "
                             "(migrations are append-only; never edit a released one)")
    return tuple(m for m in migrations if m.version not in applied)
