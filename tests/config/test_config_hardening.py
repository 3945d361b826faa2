"""Issue 11 items 1, 2 and 11: values that used to pass ``check-config`` and fail later (or
never), checked through the parser and through the real ``tgdaemon check-config`` command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tgdaemon.config import (
    ConfigValidationError,
    allowed_hosts,
    config_warnings,
    load_config,
    parse_config,
)

HASH = "0123456789abcdef0123456789abcdef"


def write_config(tmp_path: Path, daemon: str = "", telegram: str = "", policy: str = "") -> Path:
    path = tmp_path / "tgdaemon.toml"
    path.write_text(f"[daemon]\nstate_dir = \"{tmp_path / 'state'}\"\n{daemon}\n"
                    f"[telegram]\napi_hash = \"{HASH}\"\n"
                    f"{telegram or 'api_id = 4242'}\n[policy]\n{policy}\n")
    return path


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tgdaemon", "check-config", "--config",
                           str(path)], capture_output=True, text=True, timeout=60)


def problems(path: Path) -> tuple[str, ...]:
    with pytest.raises(ConfigValidationError) as info:
        load_config(path, env={})
    return tuple(p.removeprefix(f"{path}: ") for p in info.value.problems)


# -- item 1: the token file ----------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"   \n\t\n", b"two words\n"])
def test_an_empty_or_blank_token_file_is_a_config_error(tmp_path: Path, content: bytes):
    token = tmp_path / "token"
    token.write_bytes(content)
    token.chmod(0o600)
    path = write_config(tmp_path, 'http_token_file = "token"')
    (problem,) = problems(path)
    assert problem.startswith(f"daemon.http_token_file: {token} ")
    result = check_config(path)
    assert result.returncode == 78, result
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert "http_token_file" in result.stderr


def test_a_missing_token_file_is_a_config_error_not_a_traceback(tmp_path: Path):
    path = write_config(tmp_path, 'http_token_file = "missing"')
    assert problems(path) == (
        f"daemon.http_token_file: cannot read {tmp_path / 'missing'}: No such file or directory",)
    result = check_config(path)
    assert (result.returncode, "Traceback" in result.stderr) == (78, False), result


def test_the_token_is_read_at_load_time_and_kept_out_of_reprs(tmp_path: Path):
    (tmp_path / "token").write_text("  s3cret-token \n")
    config = load_config(write_config(tmp_path, 'http_token_file = "token"'), env={})
    assert config.daemon.http_token == "s3cret-token"
    assert "s3cret" not in repr(config)


# -- item 11: values that failed later ------------------------------------------------------


@pytest.mark.parametrize(("section", "line", "expected"), [
    ("telegram", f"api_id = {2**31}", "telegram.api_id: must be a positive 32-bit integer"),
    ("telegram", "api_id = -5", "telegram.api_id: must be a positive 32-bit integer"),
    ("policy", "connect_timeout = inf", "policy.connect_timeout: must be a finite number"),
    ("policy", "request_timeout = nan", "policy.request_timeout: must be a finite number"),
    ("policy", "request_timeout = -inf", "policy.request_timeout: must be a finite number"),
    ("policy", "backoff_cap = inf", "policy.backoff_cap: must be a finite number"),
    ("policy", "heartbeat_interval = nan", "policy.heartbeat_interval: must be a finite number"),
    ("daemon", "connect_rate = nan", "daemon.connect_rate: must be a finite number"),
    ("daemon", "drain_timeout = inf", "daemon.drain_timeout: must be a finite number"),
])
def test_check_config_rejects_values_that_fail_later(tmp_path: Path, section: str, line: str,
                                                     expected: str):
    path = write_config(tmp_path, **{section: line})
    found = problems(path)
    assert any(p.startswith(expected) for p in found), found
    result = check_config(path)
    assert result.returncode == 78, result
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_the_largest_int32_api_id_is_accepted(tmp_path: Path):
    config = load_config(write_config(tmp_path, telegram=f"api_id = {2**31 - 1}"), env={})
    assert config.telegram.api_id == 2**31 - 1


def test_check_config_warns_on_an_open_listen_address_without_a_token(tmp_path: Path):
    path = write_config(tmp_path, 'http_listen = "0.0.0.0:9464"')
    result = check_config(path)
    assert result.returncode == 0, result
    (warning,) = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert "daemon.http_listen (0.0.0.0:9464) is not a loopback address" in warning
    (tmp_path / "token").write_text("tok")
    (tmp_path / "token").chmod(0o600)
    with_token = write_config(tmp_path, 'http_listen = "0.0.0.0:9464"\n'
                                        'http_token_file = "token"')
    assert config_warnings(load_config(with_token, env={})) == []
    for local in ("127.0.0.1:9464", "[::1]:9464", "localhost:9464", "127.0.0.2:1"):
        cfg = load_config(write_config(tmp_path, f'http_listen = "{local}"'), env={})
        assert config_warnings(cfg) == [], local


@pytest.mark.parametrize("key", ["http_token_file", "master_key_file"])
def test_check_config_warns_on_secret_files_others_can_read(tmp_path: Path, key: str):
    secret = tmp_path / "secret"
    secret.write_text("tok")
    secret.chmod(0o644)
    path = write_config(tmp_path, f'{key} = "secret"')
    result = check_config(path)
    assert result.returncode == 0, result
    assert f"daemon.{key}: {secret} has mode 0644; other users can read it" in result.stderr
    secret.chmod(0o600)
    assert "warning" not in check_config(path).stderr


# -- item 2: daemon.http_allowed_hosts -------------------------------------------------------


def parse(daemon: dict[str, Any]) -> Any:
    data = {"daemon": daemon, "telegram": {"api_id": 1, "api_hash": HASH}}
    return parse_config(data, path=Path("/etc/t.toml"), env={})


def test_allowed_hosts_default_to_the_listen_host_and_loopback_names():
    assert allowed_hosts(parse({}).daemon) == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts(parse({"http_listen": "[::1]:1"}).daemon) == (
        "::1", "localhost", "127.0.0.1")
    assert allowed_hosts(parse({"http_listen": "Status.Example:9464"}).daemon) == (
        "status.example", "localhost", "127.0.0.1", "::1")


def test_allowed_hosts_are_normalised_and_replace_the_default():
    cfg = parse({"http_allowed_hosts": ["Metrics.Example.", "[::1]", "10.0.0.5"]})
    assert allowed_hosts(cfg.daemon) == ("metrics.example", "::1", "10.0.0.5")


@pytest.mark.parametrize("bad", [["host:9464"], [""], [3], "localhost", ["a b"]])
def test_allowed_hosts_reject_what_is_not_a_host(bad: Any):
    with pytest.raises(ConfigValidationError, match=r"daemon\.http_allowed_hosts"):
        parse({"http_allowed_hosts": bad})
