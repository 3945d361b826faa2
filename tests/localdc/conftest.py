"""Fixtures for the localdc tests (``localdc``, ``isolated_telethon`` and ``wait_until`` come
from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from telethon import TelegramClient

from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import make_client

PHONE = "+999 66 1000001"  # fake test number (99966 is Telegram's test prefix)


@pytest.fixture
def phone() -> str:
    return PHONE


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., TelegramClient]]:
    """Factory for stock clients pointed at a localdc; all are disconnected at teardown."""
    made: list[TelegramClient] = []

    def factory(dc: LocalDC, dc_id: int = 1, session: Any = None, **kw: Any) -> TelegramClient:
        client = make_client(dc, dc_id, session, **kw)
        made.append(client)
        return client

    yield factory
    for client in made:
        await client.disconnect()
