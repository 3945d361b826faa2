"""Config parsing: defaults, overrides, every validation rule, secrets kept out of reprs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import rsa

from tgdaemon.config import (
    AccountConfig,
    Address,
    Config,
    ConfigValidationError,
    DaemonConfig,
    PolicyConfig,
    Proxy,
    RetryLimits,
    config_warnings,
    parse_config,
)
from tgdaemon.exceptions import AccountError, ConfigError

HASH = "0123456789abcdef0123456789abcdef"
CFG = Path("/etc/tgdaemon/tgdaemon.toml")


def minimal(**sections: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"telegram": {"api_id": 4242, "api_hash": HASH}}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return data


def parse(data: dict[str, Any], **kw: Any) -> Config:
    kw.setdefault("env", {})
    return parse_config(data, path=CFG, **kw)


def problems(data: dict[str, Any], **kw: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigValidationError) as info:
        parse(data, **kw)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_minimal_config_gets_documented_defaults() -> None:
    cfg = parse(minimal())
    assert cfg.path == CFG
    assert cfg.daemon == DaemonConfig()
    assert cfg.daemon.state_dir == Path("/var/lib/tgdaemon")
    assert cfg.daemon.http_listen == Address("127.0.0.1", 9464)
    assert cfg.policy == PolicyConfig()
    assert cfg.policy.retry_limits == RetryLimits(0, 0, 0, 10, 1)
    assert cfg.telegram.api_id == 4242
    assert cfg.telegram.api_hash == HASH
    assert dict(cfg.telegram.servers) == {}
    assert cfg.accounts == ()


def test_full_account_and_lookup() -> None:
    cfg = parse(minimal(accounts=[
        {"name": "alice", "phone": "+1 555 0100", "lang_code": "PT-br",
         "proxy": "socks5://u%40x:p%3Ass@proxy.example:1080", "plugins": ["pkg.mod:run"]},
        {"name": "bob_2", "enabled": False},
    ]))
    alice = cfg.account("alice")
    assert alice.phone == "+15550100"
    assert alice.lang_code == "pt-br"
    assert alice.proxy == Proxy("socks5", "proxy.example", 1080, "u@x", "p:ss")
    assert alice.plugins == ("pkg.mod:run",)
    assert cfg.enabled_accounts == (alice,)
    with pytest.raises(AccountError):
        cfg.account("carol")


def test_proxies_parse_and_convert_for_telethon() -> None:
    cfg = parse(minimal(accounts=[
        {"name": "a", "proxy": "http://10.0.0.1:3128"},
        {"name": "b", "proxy": "mtproxy://DD0123456789abcdef0123456789abcdef@[2001:db8::1]:443"},
    ]))
    a, b = cfg.accounts
    assert a.proxy is not None
    assert a.proxy.telethon_proxy() == {
        "proxy_type": "http", "addr": "10.0.0.1", "port": 3128,
        "username": None, "password": None, "rdns": True,
    }
    assert b.proxy is not None
    assert b.proxy.telethon_proxy() == ("2001:db8::1", 443, "dd" + HASH)


def test_servers_and_ipv6_listen() -> None:
    cfg = parse(minimal(
        daemon={"http_listen": "[::1]:9000"},
        telegram={"servers": {"2": ["[::1]:14402"], "1": ["127.0.0.1:14401", "dc1.test:14411"]}},
    ))
    assert cfg.daemon.http_listen == Address("::1", 9000)
    assert str(cfg.daemon.http_listen) == "[::1]:9000"
    assert list(cfg.telegram.servers) == [1, 2]
    assert cfg.telegram.servers[1] == (Address("127.0.0.1", 14401), Address("dc1.test", 14411))


def test_empty_http_listen_disables_http() -> None:
    assert parse(minimal(daemon={"http_listen": ""})).daemon.http_listen is None


def test_http_listen_may_use_an_ephemeral_port_but_servers_may_not() -> None:
    cfg = parse(minimal(daemon={"http_listen": "127.0.0.1:0"}))
    assert cfg.daemon.http_listen == Address("127.0.0.1", 0)
    assert problems(minimal(telegram={"servers": {"1": ["127.0.0.1:0"]}})) == (
        f"{CFG}: telegram.servers.1[0]: must be \"host:port\" or \"[ipv6]:port\" "
        "(port 1-65535), not '127.0.0.1:0'",
    )


def test_state_dir_precedence_cli_over_env_over_file(tmp_path: Path) -> None:
    data = minimal(daemon={"state_dir": "state"})
    assert parse(data).daemon.state_dir == CFG.parent / "state"
    env = {"TGDAEMON_STATE_DIR": "/srv/env"}
    assert parse(data, env=env).daemon.state_dir == Path("/srv/env")
    assert parse(data, env=env, state_dir=tmp_path).daemon.state_dir == tmp_path
    assert problems(data, env={"TGDAEMON_STATE_DIR": "rel"}) == (
        f"{CFG}: TGDAEMON_STATE_DIR: must be an absolute path",
    )


def test_relative_paths_resolve_against_config_dir_and_credentials_dir() -> None:
    cfg = parse(minimal(daemon={"master_key_file": "keys/master",
                                "http_token_file": "${CREDENTIALS_DIRECTORY}/token"}),
                env={"CREDENTIALS_DIRECTORY": "/run/credentials/tgdaemon.service"},
                read_file=lambda p: b"a-token\n")
    assert cfg.daemon.master_key_file == CFG.parent / "keys/master"
    assert cfg.daemon.http_token_file == Path("/run/credentials/tgdaemon.service/token")
    assert problems(minimal(daemon={"http_token_file": "${CREDENTIALS_DIRECTORY}/t"})) == (
        f"{CFG}: daemon.http_token_file: $CREDENTIALS_DIRECTORY is not set "
        "(only ${CREDENTIALS_DIRECTORY} may be used)",
    )


def test_api_hash_from_file(tmp_path: Path) -> None:
    (tmp_path / "hash").write_text(HASH.upper() + "\n")
    data = {"telegram": {"api_id": 1, "api_hash_file": "hash"}}
    cfg = parse_config(data, path=tmp_path / "c.toml", env={})
    assert cfg.telegram.api_hash == HASH
    assert cfg.telegram.api_hash_file == tmp_path / "hash"


def test_api_hash_file_missing_or_bad(tmp_path: Path) -> None:
    data = {"telegram": {"api_id": 1, "api_hash_file": "nope"}}
    with pytest.raises(ConfigValidationError) as info:
        parse_config(data, path=tmp_path / "c.toml", env={})
    assert info.value.problems == (
        f"{tmp_path / 'c.toml'}: telegram.api_hash_file: cannot read {tmp_path / 'nope'}: "
        "No such file or directory",
    )
    (tmp_path / "nope").write_text("not-a-hash-but-secret")
    with pytest.raises(ConfigValidationError) as info:
        parse_config(data, path=tmp_path / "c.toml", env={})
    assert "must be 32 hexadecimal" in str(info.value)
    assert "secret" not in str(info.value)


def test_api_hash_rules_never_echo_the_value() -> None:
    assert problems({"telegram": {"api_id": 1}}) == (
        f"{CFG}: telegram.api_hash: required (or telegram.api_hash_file)",
    )
    both = {"telegram": {"api_id": 1, "api_hash": HASH, "api_hash_file": "/x"}}
    assert problems(both) == (
        f"{CFG}: telegram.api_hash: set exactly one of api_hash and api_hash_file",
    )
    bad = problems({"telegram": {"api_id": 1, "api_hash": "feedface" * 3}})
    assert bad == (f"{CFG}: telegram.api_hash: must be 32 hexadecimal characters",)


def test_rsa_keys_are_checked_as_pkcs1(tmp_path: Path) -> None:
    pub, _ = rsa.newkeys(512)
    (tmp_path / "good.pem").write_bytes(pub.save_pkcs1())
    (tmp_path / "bad.pem").write_text("-----BEGIN RSA PUBLIC KEY-----\nAAAA\n")
    data = {"telegram": {"api_id": 1, "api_hash": HASH, "rsa_keys": ["good.pem"]}}
    cfg = parse_config(data, path=tmp_path / "c.toml", env={})
    assert cfg.telegram.rsa_keys == (tmp_path / "good.pem",)
    data["telegram"]["rsa_keys"] = ["good.pem", "bad.pem", "gone.pem", 3]
    with pytest.raises(ConfigValidationError) as info:
        parse_config(data, path=tmp_path / "c.toml", env={})
    c = tmp_path / "c.toml"
    assert info.value.problems == (
        f"{c}: telegram.rsa_keys[1]: {tmp_path / 'bad.pem'} is not a PKCS#1 PEM RSA public key "
        "(-----BEGIN RSA PUBLIC KEY-----)",
        f"{c}: telegram.rsa_keys[2]: cannot read {tmp_path / 'gone.pem'}: "
        "No such file or directory",
        f"{c}: telegram.rsa_keys[3]: must be a non-empty path string, not an integer",
    )


def test_unknown_keys_at_every_level_with_suggestions() -> None:
    data = minimal(
        deamon={},
        daemon={"log_levle": "info"},
        telegram={"api_idd": 1},
        policy={"retry_limits": {"netwrok": 1}},
        accounts=[{"name": "a", "phnoe": "+15550100"}],
    )
    assert problems(data) == (
        f"{CFG}: deamon: unknown key (did you mean 'daemon'?)",
        f"{CFG}: daemon.log_levle: unknown key (did you mean 'log_level'?)",
        f"{CFG}: telegram.api_idd: unknown key (did you mean 'api_id'?)",
        f"{CFG}: policy.retry_limits.netwrok: unknown key (did you mean 'network'?)",
        f"{CFG}: accounts[0].phnoe: unknown key (did you mean 'phone'?)",
    )


def test_all_problems_reported_together() -> None:
    data = minimal(
        daemon={"log_level": "loud", "connect_burst": 0, "drain_timeout": "10",
                "http_listen": "localhost", "metrics_histograms": "none",
                "metrics_counters": "per-dc"},
        telegram={"api_id": True, "servers": {"x": ["a:1"], "3": [], "4": ["[::1]:0"]}},
        policy={"heartbeat_interval": 60, "stale_after": 60.0, "backoff_cap": 0.5,
                "backoff_jitter": "half", "flood_sleep_max": 1.5, "failover_after": 0},
        accounts=[{"name": "Alice"}, {"phone": "12"}, {"name": "x", "plugins": ["nocolon"]},
                  {"name": "x", "lang_code": "english!", "device_model": ""}, 7],
    )
    assert problems(data) == (
        f"{CFG}: daemon.http_listen: must be \"host:port\" or \"[ipv6]:port\" (port 0-65535), "
        "not 'localhost'",
        f"{CFG}: daemon.log_level: must be one of debug|info|warning|error, not 'loud'",
        f"{CFG}: daemon.connect_burst: must be >= 1, not 0",
        f"{CFG}: daemon.drain_timeout: must be a number, not a string",
        f"{CFG}: daemon.metrics_histograms: must be one of account|fleet, not 'none'",
        f"{CFG}: daemon.metrics_counters: must be one of account|fleet, not 'per-dc'",
        f"{CFG}: telegram.api_id: must be an integer, not a boolean",
        f"{CFG}: telegram.servers.x: keys must be DC ids (integers 1-9999)",
        f"{CFG}: telegram.servers.3: must be a non-empty array of \"host:port\" strings",
        f"{CFG}: telegram.servers.4[0]: must be \"host:port\" or \"[ipv6]:port\" "
        "(port 1-65535), not '[::1]:0'",
        f"{CFG}: policy.stale_after: must be > heartbeat_interval (60)",
        f"{CFG}: policy.backoff_cap: must be >= backoff_base (1)",
        f"{CFG}: policy.backoff_jitter: must be one of full|none, not 'half'",
        f"{CFG}: policy.flood_sleep_max: must be an integer, not a float",
        f"{CFG}: policy.failover_after: must be >= 1, not 0",
        f"{CFG}: accounts[0].name: must match [a-z0-9_-]{{1,32}}",
        f"{CFG}: accounts[1].name: required",
        f"{CFG}: accounts[1].phone: must be an international number (+ and 5-15 digits)",
        f"{CFG}: accounts[2].plugins[0]: must look like \"pkg.module:function\", not 'nocolon'",
        f"{CFG}: accounts[3].name: duplicate name 'x' (also accounts[2])",
        f"{CFG}: accounts[3].device_model: must be 1-64 printable characters",
        f"{CFG}: accounts[3].lang_code: must be a language code like \"en\" or \"pt-br\", "
        "not 'english!'",
        f"{CFG}: accounts[4]: must be a table, not an integer",
    )


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({}, "telegram: required section missing"),
        (minimal(daemon=[1]), "daemon: must be a table, not an array"),
        (minimal(accounts={"name": "a"}),
         "accounts: must be an array of tables ([[accounts]]), not a table"),
        (minimal(telegram={"api_id": 0}),
         "telegram.api_id: must be a positive 32-bit integer (1-2147483647)"),
        (minimal(accounts=[{"name": "a", "enabled": "yes"}]),
         "accounts[0].enabled: must be a boolean, not a string"),
        (minimal(accounts=[{"name": "a", "plugins": ["a:b", "a:b"]}]),
         "accounts[0].plugins[1]: duplicate plugin 'a:b'"),
        (minimal(policy={"retry_limits": {"unknown": -1}}),
         "policy.retry_limits.unknown: must be >= 0, not -1"),
        (minimal(accounts=[{"name": "a", "proxy": "ftp://h:1"}]),
         "accounts[0].proxy: scheme must be socks5://, socks4://, http:// or mtproxy://"),
        (minimal(accounts=[{"name": "a", "proxy": "socks5://h:1/path"}]),
         "accounts[0].proxy: must not have a path, query or fragment"),
        (minimal(accounts=[{"name": "a", "proxy": "mtproxy://zz@h:1"}]),
         "accounts[0].proxy: mtproxy needs mtproxy://SECRET@host:port with a hex secret "
         "(32 hex digits, or dd + 32)"),
        (minimal(accounts=[{"name": "a",
                            "proxy": "mtproxy://ee" + "ab" * 16 + "676f6f676c652e636f6d@h:1"}]),
         "accounts[0].proxy: fake-TLS (ee) MTProxy secrets are not supported (Telethon 1.45 "
         "has no fake-TLS transport); use the proxy's dd secret"),
    ],
)
def test_single_rules(data: dict[str, Any], expected: str) -> None:
    assert f"{CFG}: {expected}" in problems(data)


def test_ints_are_accepted_for_float_keys() -> None:
    cfg = parse(minimal(policy={"heartbeat_interval": 10, "stale_after": 25}))
    assert cfg.policy.heartbeat_interval == 10.0
    assert isinstance(cfg.policy.heartbeat_interval, float)


def test_defaults_have_no_warnings() -> None:
    assert config_warnings(parse(minimal())) == []


def test_stale_after_below_a_slow_heartbeat_is_a_warning_not_an_error() -> None:
    # 1.1 x 20 + 15 = 37 s can pass between two answered heartbeats of a healthy worker.
    cfg = parse(minimal(policy={"heartbeat_interval": 20, "stale_after": 30,
                                "request_timeout": 15}))
    (warning,) = config_warnings(cfg)
    assert warning.startswith(f"{CFG}: policy.stale_after (30)")
    assert "37" in warning
    ok = parse(minimal(policy={"heartbeat_interval": 20, "stale_after": 37,
                               "request_timeout": 15}))
    assert config_warnings(ok) == []


def test_secrets_stay_out_of_reprs_and_errors() -> None:
    secrets = ["+15550100999", "hunter2pass", "c0ffee" * 5 + "ab", HASH]
    cfg = parse(minimal(accounts=[
        {"name": "a", "phone": secrets[0], "proxy": f"socks5://bob:{secrets[1]}@h:1"},
        {"name": "b", "proxy": f"mtproxy://{secrets[2]}@h:2"},
    ]))
    text = repr(cfg) + str(cfg)
    for s in secrets:
        assert s not in text
    assert "15550100999" not in text
    bad = minimal(accounts=[
        {"name": "a", "phone": "+1555abc0100"},
        {"name": "b", "proxy": f"socks5://bob:{secrets[1]}@h:99999"},
        {"name": "c", "proxy": f"mtproxy://{secrets[1]}@h:2"},
    ])
    message = "\n".join(problems(bad))
    assert "1555" not in message
    assert secrets[1] not in message
    assert isinstance(AccountConfig("x", phone="+1"), AccountConfig)


def test_validation_error_is_a_config_error_with_exit_code_78() -> None:
    with pytest.raises(ConfigError) as info:
        parse({})
    assert info.value.exit_code == 78


def test_account_name_that_looks_like_a_phone_number_is_rejected(tmp_path) -> None:
    data = {"telegram": {"api_id": 1, "api_hash": "0" * 32},
            "accounts": [{"name": "15550100"}, {"name": "alice7"}]}
    with pytest.raises(ConfigValidationError) as info:
        parse_config(data, path=tmp_path / "c.toml", env={})
    expected = (f"{tmp_path / 'c.toml'}: accounts[0].name: must not be all digits "
                "(it would look like a phone number in metrics and logs)")
    assert info.value.problems == (expected,)
