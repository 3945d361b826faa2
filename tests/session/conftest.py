from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tgdaemon.crypto import KeyRing, generate_keyring
from tgdaemon.store import SessionData, Store


@pytest.fixture
def ring() -> KeyRing:
    return generate_keyring()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
async def store(state_dir: Path, ring: KeyRing) -> AsyncIterator[Store]:
    s = await Store.open(state_dir, ring)
    try:
        yield s
    finally:
        await s.close()


def make_session(seq: int = 0, *, dc_id: int = 2, user_id: int | None = None) -> SessionData:
    return SessionData(
        dc_id=dc_id, server_address="149.154.167.51", port=443, auth_key=os.urandom(256),
        user_id=user_id, pts=seq, qts=0, date=1_700_000_000, seq=seq,
    )
