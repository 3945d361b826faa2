"""The fleet keys of [daemon]: defaults, the instance id from the environment, validation,
the warning about heartbeats slower than the server-side disconnect, and secrets."""

from __future__ import annotations

import pytest

from tests.config.test_config_parse import minimal, parse, problems
from tgdaemon.config import INSTANCE_ENV, config_warnings


def test_defaults_are_a_single_daemon() -> None:
    d = parse(minimal()).daemon
    assert not d.clustered
    assert (d.instance_id, d.capacity, d.database_url) == ("", 10_000, "")
    assert (d.lease_ttl, d.lease_renew_interval, d.lease_moves_per_minute) == (60.0, 10.0, 120)


def test_instance_id_from_the_file_or_the_unit() -> None:
    assert parse(minimal(daemon={"instance_id": "a-1"})).daemon.instance_id == "a-1"
    d = parse(minimal(daemon={"instance_id": "a-1"}), env={INSTANCE_ENV: "web@2"}).daemon
    assert d.instance_id == "web@2"
    assert d.clustered


def test_database_url_is_not_in_reprs() -> None:
    d = parse(minimal(daemon={"instance_id": "a",
                              "database_url": "postgresql://u:hunter2@db/fleet"})).daemon
    assert d.database_url == "postgresql://u:hunter2@db/fleet"
    assert "hunter2" not in repr(d)


@pytest.mark.parametrize(("daemon", "expected"), [
    ({"instance_id": "no spaces"}, "daemon.instance_id: must match"),
    ({"database_url": "postgresql://db/x"}, "daemon.database_url: needs daemon.instance_id"),
    ({"instance_id": "a", "database_url": "mysql://db/x"},
     "daemon.database_url: must be a postgresql:// URL"),
    ({"lease_ttl": 30, "lease_renew_interval": 13},
     "daemon.lease_ttl: lease_ttl (30) must be at least 2 x lease_renew_interval + close margin"),
    ({"lease_ttl": 0}, "daemon.lease_ttl: must be > 0"),
    ({"capacity": 0}, "daemon.capacity: must be >= 1"),
    ({"lease_moves_per_minute": -1}, "daemon.lease_moves_per_minute: must be >= 0"),
])
def test_invalid(daemon: dict[str, object], expected: str) -> None:
    found = problems(minimal(daemon=daemon))
    assert any(expected in p for p in found), found


def test_heartbeat_slower_than_the_lease_room_warns() -> None:
    ok = parse(minimal(daemon={"instance_id": "a"}))
    assert config_warnings(ok) == []
    slow = parse(minimal(daemon={"instance_id": "a"}, policy={"heartbeat_interval": 40}))
    assert any("daemon.lease_ttl (60) leaves 38 s" in w for w in config_warnings(slow))
    single = parse(minimal(policy={"heartbeat_interval": 40}))
    assert not any("lease_ttl" in w for w in config_warnings(single))
