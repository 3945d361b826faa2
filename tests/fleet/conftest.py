"""Fixtures of the fleet tests: lease settings short enough for tests, on both backends."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

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
