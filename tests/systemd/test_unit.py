"""The systemd unit: valid for systemd itself, hardened, and consistent with the daemon.

Uses the real ``systemd-analyze`` (Debian package ``systemd``); only where it is not installed
are its tests skipped, with the reason shown.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tgdaemon.config import load_config
from tgdaemon.crypto import CREDENTIAL_NAME, generate_keyring, load_keyring, write_key_file
from tgdaemon.daemon import _tick
from tgdaemon.exceptions import ConfigError
from tgdaemon.notify import Notifier

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "tgdaemon.service"
EXAMPLE_CONFIG = ROOT / "config" / "tgdaemon.example.toml"
MAX_EXPOSURE = 1.5
ANALYZE_ENV = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"}
_EXPOSURE_RE = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?) (\w+)")

Unit = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> Unit:
    """Sections -> key -> every value in order (systemd keys may repeat); continuation lines
    joined, comments dropped. Enough for our own unit file, not a general parser."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    logical: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if logical:
            logical[-1] += " " + line.rstrip("\\").strip()
            if not line.endswith("\\"):
                logical.pop()
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"key outside a section: {line!r}"
        key, _, value = line.partition("=")
        values = section.setdefault(key.strip(), [])
        values.append(value.strip().rstrip("\\").strip())
        if line.endswith("\\"):
            logical.append(values[-1])
    return unit


def seconds(value: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


@pytest.fixture(scope="module")
def unit() -> Unit:
    return parse_unit(UNIT.read_text())


def service(unit: Unit, key: str) -> list[str]:
    return unit["Service"].get(key, [])


def last(unit: Unit, key: str) -> str:
    values = service(unit, key)
    assert values, f"[Service] {key}= missing"
    return values[-1]


# -- what the unit promises ---------------------------------------------------------------------


def test_service_contract(unit):
    assert last(unit, "Type") == "notify"
    assert last(unit, "NotifyAccess") == "main"
    assert last(unit, "Restart") == "on-failure"
    assert last(unit, "ExecStart") == "/usr/bin/tgdaemon run --config /etc/tgdaemon/tgdaemon.toml"
    reload_cmd = last(unit, "ExecReload").split()
    assert reload_cmd[0].endswith("/kill")
    assert reload_cmd[1:] == ["-HUP", "$MAINPID"]
    # A broken config (exit 78) must not restart in a loop.
    assert str(ConfigError.exit_code) in last(unit, "RestartPreventExitStatus").split()
    assert last(unit, "StateDirectory") == "tgdaemon"
    assert last(unit, "ConfigurationDirectory") == "tgdaemon"
    assert last(unit, "DynamicUser") == "yes" or last(unit, "User") not in ("", "root")
    assert last(unit, "UMask") == "0077"
    assert last(unit, "StateDirectoryMode") == "0700"
    assert "network-online.target" in unit["Unit"].get("After", [""])[-1].split()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_master_key_is_the_credential_the_daemon_reads(unit, tmp_path):
    creds = service(unit, "LoadCredentialEncrypted") + service(unit, "LoadCredential")
    names = [c.split(":", 1)[0] for c in creds]
    assert names == [CREDENTIAL_NAME]
    # The daemon finds the key under that name in $CREDENTIALS_DIRECTORY, as systemd lays it out.
    ring = generate_keyring()
    write_key_file(tmp_path / names[0], ring)
    loaded = load_keyring(key_file=None, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert loaded.active.key_id == ring.active.key_id


def test_hardening_directives(unit):
    expected = {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes", "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes", "ProtectClock": "yes", "ProtectHostname": "yes",
        "RestrictNamespaces": "yes", "RestrictRealtime": "yes", "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes", "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
    }
    for key, value in expected.items():
        assert last(unit, key) == value, key
    assert service(unit, "SystemCallFilter")[0] == "@system-service"
    assert set(last(unit, "RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}


def test_limits_fit_a_fleet_and_the_daemon_timing(unit):
    # 10,000 accounts = 10,000 sockets, plus the database, the HTTP server and headroom.
    assert int(last(unit, "LimitNOFILE")) >= 20_000
    config = load_config(EXAMPLE_CONFIG)
    watchdog = seconds(last(unit, "WatchdogSec"))
    notifier = Notifier({"WATCHDOG_USEC": str(int(watchdog * 1e6))})
    # The serve loop pings once per tick: it must be well inside systemd's deadline.
    assert _tick(notifier, config) <= watchdog / 2
    assert seconds(last(unit, "TimeoutStopSec")) > config.daemon.drain_timeout + 5


# -- systemd-analyze ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install -y systemd)")
    return tool


def installed_copy(directory: Path, text: str | None = None) -> Path:
    """The unit with ExecStart pointing at this venv's tgdaemon: verify wants a real binary."""
    script = Path(sys.executable).parent / "tgdaemon"
    assert script.exists(), script
    text = UNIT.read_text() if text is None else text
    text, n = re.subn(r"^ExecStart=/usr/bin/tgdaemon ", f"ExecStart={script} ", text, flags=re.M)
    assert n == 1
    path = directory / "tgdaemon.service"
    path.write_text(text)
    return path


def verify_problems(analyze: str, path: Path) -> list[str]:
    """What ``systemd-analyze verify`` objects to in this unit (exit status and its lines)."""
    proc = subprocess.run([analyze, "verify", "--man=no", str(path)], capture_output=True,
                          text=True, timeout=60, env=ANALYZE_ENV)
    # It also reports on unrelated installed units; only lines about ours count (it exits 0
    # even for unknown keys, so the lines matter as much as the status).
    problems = [line for line in (proc.stdout + proc.stderr).splitlines() if path.name in line]
    if proc.returncode != 0:
        problems.append(f"exit status {proc.returncode}")
    return problems


def exposure(analyze: str, path: Path) -> tuple[float, str]:
    proc = subprocess.run([analyze, "security", "--offline=true", "--no-pager", str(path)],
                          capture_output=True, text=True, timeout=60, env=ANALYZE_ENV)
    match = _EXPOSURE_RE.search(proc.stdout + proc.stderr)
    assert match, f"no exposure line in:\n{proc.stdout}{proc.stderr}"
    assert match[1] == path.name
    return float(match[2]), match[3]


def test_systemd_analyze_verify_passes(analyze, tmp_path):
    assert verify_problems(analyze, installed_copy(tmp_path)) == []


def test_verify_check_catches_mistakes(analyze, tmp_path):
    bad = UNIT.read_text().replace("Type=notify", "Type=notify\nRestartPreventExitStatuss=78")
    assert verify_problems(analyze, installed_copy(tmp_path, bad))
    missing = tmp_path / "missing"
    missing.mkdir()
    path = missing / "tgdaemon.service"
    path.write_text(UNIT.read_text().replace("/usr/bin/tgdaemon", "/nonexistent/tgdaemon"))
    assert verify_problems(analyze, path)


def test_security_exposure_at_most_1_5(analyze, tmp_path):
    score, verdict = exposure(analyze, installed_copy(tmp_path))
    assert score <= MAX_EXPOSURE, f"exposure {score} {verdict}"
    assert verdict == "OK"


def test_exposure_check_can_fail(analyze, tmp_path):
    hardening = ("Protect", "Private", "Restrict", "SystemCall", "Capability", "NoNewPrivileges",
                 "MemoryDeny", "LockPersonality", "DynamicUser", "User=", "Group=")
    weak = "\n".join(line for line in UNIT.read_text().splitlines()
                     if not line.startswith(hardening))
    score, _verdict = exposure(analyze, installed_copy(tmp_path, weak))
    assert score > MAX_EXPOSURE
