"""The [security] section and the per-account override."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tgdaemon.config import ConfigValidationError, SecurityConfig, parse_config
from tgdaemon.security import OnNewAuthorization

HASH = "0123456789abcdef0123456789abcdef"
CFG = Path("/etc/tgdaemon/tgdaemon.toml")


def parse(**extra: Any):
    data = {"telegram": {"api_id": 1, "api_hash": HASH}, **extra}
    return parse_config(data, path=CFG, env={})


def test_defaults_alert_every_four_hours():
    cfg = parse(accounts=[{"name": "a"}])
    assert cfg.security == SecurityConfig()
    assert cfg.security.on_new_authorization is OnNewAuthorization.ALERT
    assert cfg.security.check_interval == 14400
    assert cfg.on_new_authorization(cfg.account("a")) is OnNewAuthorization.ALERT


def test_fleet_setting_and_account_override():
    cfg = parse(
        security={"on_new_authorization": "terminate", "check_interval": 600,
                  "allow": ["iPhone*", "Telegram Desktop*"], "log_ip": True},
        accounts=[{"name": "a"}, {"name": "b", "on_new_authorization": "alert"}],
    )
    assert cfg.security.allow == ("iPhone*", "Telegram Desktop*")
    assert cfg.security.log_ip is True
    assert cfg.security.check_interval == 600
    assert cfg.on_new_authorization(cfg.account("a")) is OnNewAuthorization.TERMINATE
    assert cfg.on_new_authorization(cfg.account("b")) is OnNewAuthorization.ALERT


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"security": {"on_new_authorization": "kill"}},
         "security.on_new_authorization: must be one of alert|terminate"),
        ({"security": {"check_interval": 5}}, "security.check_interval: must be >= 60"),
        ({"security": {"allow": "iPhone*"}}, "security.allow: must be an array"),
        ({"security": {"allow": [""]}}, "security.allow: must be an array"),
        ({"security": {"log_ipp": True}}, "security.log_ipp: unknown key"),
        ({"accounts": [{"name": "a", "on_new_authorization": "nuke"}]},
         "accounts[0].on_new_authorization: must be one of alert|terminate"),
    ],
)
def test_bad_values_are_reported(extra, expected):
    with pytest.raises(ConfigValidationError) as info:
        parse(**extra)
    assert any(expected in p for p in info.value.problems), info.value.problems
