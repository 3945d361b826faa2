"""Fixtures for the localdc tests: a fresh LocalDC per test, isolated Telethon globals."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from telethon import TelegramClient

from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import make_client, telethon_isolation

PHONE = "+999 66 1000001"  # fake test number (99966 is Telegram's test prefix)


@pytest.fixture
def phone() -> str:
    return PHONE


@pytest.fixture
def isolated_telethon() -> Iterator[None]:
    with telethon_isolation():
        yield


@pytest.fixture
async def localdc(tmp_path: Path, isolated_telethon: None) -> AsyncIterator[LocalDC]:
    async with LocalDC(tmp_path / "localdc", dcs=2) as dc:
        yield dc


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


async def _wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll a condition (cheaply) until it holds; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


@pytest.fixture
def wait_until() -> Callable[..., Any]:
    return _wait_until
