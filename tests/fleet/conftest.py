"""Fixtures of the fleet tests: lease settings short enough for tests, on both backends."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pytest

from tests.conftest import phone_for
from tgdaemon.config import Config
from tgdaemon.daemon import Daemon
from tgdaemon.status import State

#: Short leases keep the tests quick (README: how to choose the TTL).
FLEET = {"lease_ttl": 3.0, "lease_renew_interval": 0.5, "lease_moves_per_minute": 600}


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    """``[daemon]`` keys of a fleet on SQLite, or on a fresh PostgreSQL database."""
    if request.param == "postgresql":
        return {**FLEET, "database_url": request.getfixturevalue("pg_url")}
    return dict(FLEET)


def as_instance(config: Config, instance: str) -> Config:
    return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon,
                                                                  instance_id=instance))


def connected(*daemons: Daemon) -> list[str]:
    return sorted(s.account for d in daemons for s in d.board.snapshot()
                  if s.state is State.CONNECTED)


async def logged_in_fleet(make_config: Callable[..., Config],
                          login_account: Callable[[Config, str], Awaitable[Any]],
                          names: Sequence[str], daemon: dict[str, Any]) -> Config:
    """The accounts logged in once through a plain single-daemon config, then the fleet's
    config of the same accounts with these ``[daemon]`` keys."""
    accounts = [{"name": n, "phone": phone_for(n)} for n in names]
    plain = make_config(accounts)
    for n in names:
        await login_account(plain, n)
    return make_config(accounts, daemon=daemon)
