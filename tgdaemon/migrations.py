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
)

LATEST = MIGRATIONS[-1].version
