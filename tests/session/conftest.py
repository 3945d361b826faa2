from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tgdaemon.crypto import KeyRing, generate_keyring
from tgdaemon.store import Store


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
