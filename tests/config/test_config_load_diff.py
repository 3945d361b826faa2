"""load_config (file I/O, TOML errors, the shipped example) and diff_config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from tgdaemon.config import (
    Config,
    ConfigDiff,
    ConfigValidationError,
    DaemonConfig,
    PolicyConfig,
    SecurityConfig,
    diff_config,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "tgdaemon.example.toml"
HASH = "0123456789abcdef0123456789abcdef"


def test_example_config_loads_and_documents_every_key() -> None:
    cfg = load_config(EXAMPLE, env={})
    assert cfg.telegram.api_id == 12345
    assert [a.name for a in cfg.accounts] == ["alice", "bob"]
    assert [a.name for a in cfg.enabled_accounts] == ["alice"]
    text = EXAMPLE.read_text()
    for section in (cfg.daemon, cfg.policy, cfg.policy.retry_limits, cfg.security,
                    cfg.accounts[0]):
        for f in dataclasses.fields(section):
            if f.name != "retry_limits" and "read_from" not in f.metadata:
                assert f"\n{f.name} = " in text, f.name
    assert "[policy.retry_limits]" in text
    # The example shows the defaults: loading it must give exactly the built-in values.
    assert cfg.daemon == DaemonConfig()
    assert cfg.policy == PolicyConfig()
    assert cfg.security == SecurityConfig()
    for key in ("api_id", "api_hash", "api_hash_file", "rsa_keys", "use_ipv6"):
        assert f"\n{key} = " in text, key
    assert "[telegram.servers]" in text


def test_load_reads_toml_file(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text(f'[telegram]\napi_id = 7\napi_hash = "{HASH}"\n[[accounts]]\nname = "a"\n')
    cfg = load_config(p, env={})
    assert cfg.path == p
    assert cfg.account("a").enabled


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text("[daemon]\nlog_level = \n")
    with pytest.raises(ConfigValidationError) as info:
        load_config(p, env={})
    assert info.value.problems == (f"{p}: line 2, column 13: TOML syntax error: Invalid value",)


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigValidationError) as info:
        load_config(missing, env={})
    assert info.value.problems == (f"{missing}: cannot read: No such file or directory",)
    with pytest.raises(ConfigValidationError) as info:
        load_config(tmp_path, env={})
    assert info.value.problems == (f"{tmp_path}: cannot read: Is a directory",)
    binary = tmp_path / "b.toml"
    binary.write_bytes(b"a = 1\n\xff\n")
    with pytest.raises(ConfigValidationError) as info:
        load_config(binary, env={})
    assert info.value.problems == (f"{binary}: not UTF-8 (byte 6)",)


def test_duplicate_toml_key_is_a_syntax_error(tmp_path: Path) -> None:
    p = tmp_path / "t.toml"
    p.write_text("[daemon]\nlog_level = 'info'\nlog_level = 'debug'\n")
    with pytest.raises(ConfigValidationError, match="TOML syntax error: Cannot overwrite"):
        load_config(p, env={})


# --------------------------------------------------------------------------- diff


def config(*accounts: dict[str, object], **sections: dict[str, object]) -> Config:
    data: dict[str, object] = {"telegram": {"api_id": 1, "api_hash": HASH}, **sections}
    data["accounts"] = list(accounts)
    return parse_config(data, path=Path("/c.toml"), env={})


def test_diff_of_identical_configs_changes_nothing() -> None:
    old = config({"name": "a"}, {"name": "b"})
    assert diff_config(old, old) == ConfigDiff((), (), (), ("a", "b"), False, False)


def test_diff_classifies_accounts() -> None:
    old = config(
        {"name": "keep"}, {"name": "gone"}, {"name": "stopping"},
        {"name": "edited", "device_model": "x"}, {"name": "starting", "enabled": False},
        {"name": "asleep", "enabled": False},
    )
    new = config(
        {"name": "new"}, {"name": "keep"}, {"name": "stopping", "enabled": False},
        {"name": "edited", "device_model": "y"}, {"name": "starting"},
        {"name": "asleep", "enabled": False, "lang_code": "de"},
    )
    d = diff_config(old, new)
    assert d.added == ("new", "starting")
    assert d.removed == ("gone", "stopping")
    assert d.changed == ("edited",)
    assert d.unchanged == ("keep",)
    assert (d.policy_changed, d.telegram_changed) == (False, False)


def test_diff_sees_phone_and_proxy_changes_as_changed() -> None:
    old = config({"name": "a", "phone": "+15550100"}, {"name": "b"})
    new = config({"name": "a", "phone": "+15550101"}, {"name": "b", "proxy": "http://h:1"})
    assert diff_config(old, new).changed == ("a", "b")


def test_diff_flags_sections() -> None:
    old = config({"name": "a"})
    new = config(
        {"name": "a"},
        daemon={"log_level": "debug"},
        policy={"backoff_cap": 45.0},
        telegram={"api_id": 1, "api_hash": HASH, "servers": {"1": ["127.0.0.1:1"]}},
    )
    d = diff_config(old, new)
    assert (d.policy_changed, d.telegram_changed) == (True, True)
    assert d.unchanged == ("a",)
