"""Two daemons in one process share a fleet through leases: every account runs exactly once,
the fleet spreads, a clean stop hands its accounts over at once.  Both backends."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tests.conftest import phone_for
from tgdaemon.config import Config
from tgdaemon.daemon import Daemon
from tgdaemon.status import State

NAMES = [f"acc{i}" for i in range(6)]
FLEET = {"lease_ttl": 3.0, "lease_renew_interval": 0.5, "lease_moves_per_minute": 600}


def as_instance(config: Config, instance: str) -> Config:
    return dataclasses.replace(config, daemon=dataclasses.replace(config.daemon,
                                                                  instance_id=instance))


def connected(*daemons: Daemon) -> list[str]:
    return sorted(s.account for d in daemons for s in d.board.snapshot()
                  if s.state is State.CONNECTED)


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet_settings(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "postgresql":
        return {**FLEET, "database_url": request.getfixturevalue("pg_url")}
    return FLEET


async def test_two_daemons_split_the_fleet_and_hand_over_on_stop(
        make_config, login_account, localdc, wait_until, fleet_settings) -> None:
    plain = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES])
    for n in NAMES:
        await login_account(plain, n)
    config = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES],
                         daemon={**fleet_settings, "instance_id": "one"})
    async with Daemon(config) as one, Daemon(as_instance(config, "two")) as two:
        await wait_until(lambda: connected(one, two) == NAMES, 30, "all connected once")
        assert one.fleet is not None
        assert two.fleet is not None
        assert not one.fleet.owned & two.fleet.owned
        await wait_until(lambda: len(one.fleet.owned) == len(two.fleet.owned) == 3, 30,
                         "three each")
        assert localdc.overlaps() == {} if hasattr(localdc, "overlaps") else True
        await two.stop()
        await wait_until(lambda: len(one.fleet.owned) == 6, 10, "one takes all after a stop")
        await wait_until(lambda: connected(one) == NAMES, 30, "all connected on one")
