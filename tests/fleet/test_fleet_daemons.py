"""Two daemons in one process share a fleet through leases: every account runs exactly once,
the fleet spreads, a clean stop hands its accounts over at once.  Both backends."""

from __future__ import annotations

from prometheus_client import generate_latest

from tests.conftest import phone_for
from tests.daemon.test_connect import sample
from tests.fleet.conftest import FLEET, as_instance, connected, logged_in_fleet
from tgdaemon.daemon import Daemon

NAMES = [f"acc{i}" for i in range(6)]


async def test_two_daemons_split_the_fleet_and_hand_over_on_stop(
        make_config, login_account, localdc, wait_until, fleet_settings) -> None:
    config = await logged_in_fleet(make_config, login_account, NAMES,
                                   {**fleet_settings, "instance_id": "one"})
    async with Daemon(config) as one, Daemon(as_instance(config, "two")) as two:
        await wait_until(lambda: connected(one, two) == NAMES, 30, "all connected once")
        assert one.fleet is not None
        assert two.fleet is not None
        assert not one.fleet.owned & two.fleet.owned
        await wait_until(lambda: len(one.fleet.owned) == len(two.fleet.owned) == 3, 30,
                         "three each")
        # the fleet's series, as the alert rules read them (config/prometheus-alerts.yml)
        def scrape() -> str:
            return generate_latest(one.registry).decode()

        # as of one's latest round (a round after two's claims says 0)
        await wait_until(lambda: sample(scrape(), "tgdaemon_accounts_unowned") == 0, 10,
                         "no unowned account")
        text = scrape()
        assert sample(text, "tgdaemon_leases_owned") == 3
        assert sample(text, "tgdaemon_instances_lost") == 0
        assert (sample(text, "tgdaemon_lease_renewals_total", result="ok") or 0) > 0
        assert sample(text, "tgdaemon_lease_renewals_total", result="error") == 0
        await two.stop()
        await wait_until(lambda: len(one.fleet.owned) == 6, 10, "one takes all after a stop")
        await wait_until(lambda: connected(one) == NAMES, 30, "all connected on one")


async def test_capacity_bounds_what_an_instance_holds(
        make_config, login_account, wait_until) -> None:
    config = make_config([{"name": n, "phone": phone_for(n)} for n in NAMES[:4]],
                         daemon={**FLEET, "instance_id": "small", "capacity": 2})
    for n in NAMES[:4]:
        await login_account(config, n)
    async with Daemon(config) as daemon:
        assert daemon.fleet is not None
        await wait_until(lambda: len(connected(daemon)) == 2, 20, "two connected")
        await wait_until(
            lambda: sample(generate_latest(daemon.registry).decode(),
                           "tgdaemon_accounts_unowned") == 2, 10, "two unowned")
        for _ in range(3):  # further rounds claim nothing more
            rounds = daemon.fleet.rounds
            await wait_until(lambda r=rounds: daemon.fleet.rounds > r, 10, "a round")
        assert len(daemon.fleet.owned) == 2
