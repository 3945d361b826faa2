"""The shipped unit under a real systemd 252, booted once for this module with systemd-nspawn.

The container runs ``systemd/tgdaemon.service`` as shipped; one drop-in points ``ExecStart=``
at this clone's venv (bound read-only at the same path). localdc runs inside the container
too (``--private-network`` leaves it only its own loopback), as a transient service. The
master key is the shipped ``LoadCredentialEncrypted=`` credential, encrypted with
``systemd-creds`` under the container's own host key (no TPM); one test swaps it for a plain
``LoadCredential=`` in a drop-in. Accounts are logged in with the CLI as the service's
dynamic user, as systemd/README.md tells operators to.

Skipped, with the reason, only where the container cannot boot (not root, no
systemd-nspawn, no namespaces).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import phone_for, wait_for_condition
from tests.leakscan import secrets_found
from tests.systemd.nspawn import (
    HOME_DIRS,
    MASKED,
    Container,
    ContainerUnavailable,
    booted,
    is_under,
)
from tgdaemon.crypto import CREDENTIAL_NAME, KeyRing, generate_keyring, write_key_file
from tgdaemon.exceptions import ConfigError
from tgdaemon.localdc.testing import daemon_config_toml
from tgdaemon.store import Store

# Booting, localdc and two CLI logins count towards the first test's time.
pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "tgdaemon.service"
TGDAEMON = Path(sys.executable).parent / "tgdaemon"
SERVICE = "tgdaemon.service"
DROPINS = "/etc/systemd/system/tgdaemon.service.d"
CONFIG = "/etc/tgdaemon/tgdaemon.toml"
PLAIN_KEY = "/etc/tgdaemon/tgdaemon.key"
ENCRYPTED_KEY = f"/etc/credstore.encrypted/{CREDENTIAL_NAME}"
STATE = "/var/lib/private/tgdaemon"  # where DynamicUser= keeps StateDirectory=tgdaemon
LOCALDC_STATE = "/var/lib/localdc"
LOCALDC_PORT = 4430
CONTROL = "http://127.0.0.1:4480"
STATUS = "http://127.0.0.1:9464/status"
READYZ = "http://127.0.0.1:9464/readyz"
WATCHDOG_SEC = 3
POLL = 0.1
#: systemd's range for dynamic users (DynamicUser=).
DYNAMIC_UIDS = range(61184, 65520)
#: GET (no body) or POST (JSON body) from inside the container; prints the JSON reply.
_HTTP = ("import json, sys, urllib.request as u\n"
         "data = sys.argv[2].encode() if len(sys.argv) > 2 else None\n"
         "req = u.Request(sys.argv[1], data, {'Content-Type': 'application/json'})\n"
         "print(u.urlopen(req, timeout=5).read().decode())\n")


async def until(predicate: Any, timeout: float, message: str) -> None:
    """:func:`wait_for_condition` at a pace fit for predicates that start processes in the
    container (each poll is an nsenter, often a Python too): a tight loop would take the CPU
    the daemon under test needs."""
    await wait_for_condition(predicate, timeout, message, interval=POLL)


# -- the container and what runs in it ---------------------------------------------------------


TMP_DIRS = (Path("/tmp"), Path("/var/tmp"))
#: Where a path that PrivateTmp= would hide is bound a second time inside the container.
ALIASES = "/opt/tgd-bind"


def paths_to_bind() -> list[Path]:
    """The clone, the venv and the interpreter it was made from (outside /usr)."""
    wanted = [ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()]
    binds: list[Path] = []
    for path in wanted:
        if is_under(path, Path("/usr")) or any(is_under(path, b) for b in binds):
            continue
        binds = [b for b in binds if not is_under(b, path)] + [path]
    return binds


def container_binds(paths: list[Path]) -> list[tuple[Path, str]]:
    """Each path at the same place inside (the venv's paths are absolute); those under /tmp
    also under :data:`ALIASES`, the source the unit's bind needs (see :func:`venv_dropin`)."""
    binds = [(p, str(p)) for p in paths]
    binds += [(p, f"{ALIASES}/{i}") for i, p in enumerate(paths)
              if any(is_under(p, t) for t in TMP_DIRS)]
    return binds


def sandbox_binds(paths: list[Path]) -> list[str]:
    """Unit settings that make ``paths`` visible, read-only and alone, in the sandbox.

    ``ProtectHome=yes`` hides /root and /home and ``PrivateTmp=yes`` (also implied by
    ``DynamicUser=yes``) hides /tmp, so a venv or interpreter there (pyenv, a clone in a home
    directory or under /tmp) needs them: ``ProtectHome=tmpfs`` keeps every other home
    directory hidden. A bind's source is looked up after PrivateTmp= replaced /tmp (measured:
    status 226/NAMESPACE), hence the alias outside /tmp as the source there."""
    settings = []
    if any(is_under(p, h) for p in paths for h in HOME_DIRS):
        settings.append("ProtectHome=tmpfs")
    for i, p in enumerate(paths):
        if any(is_under(p, h) for h in HOME_DIRS):
            settings.append(f"BindReadOnlyPaths={p}")
        elif any(is_under(p, t) for t in TMP_DIRS):
            settings.append(f"BindReadOnlyPaths={ALIASES}/{i}:{p}")
    return settings


def venv_dropin(paths: list[Path]) -> str:
    """``ExecStart=`` at this venv, plus :func:`sandbox_binds`; the shipped unit's sandbox is
    otherwise unchanged."""
    shipped = re.search(r"^ExecStart=/usr/bin/tgdaemon (.*)$", UNIT.read_text(), re.M)
    assert shipped, "the shipped ExecStart= changed: update this test"
    lines = ["[Service]", "ExecStart=", f"ExecStart={TGDAEMON} {shipped[1]}",
             *sandbox_binds(paths)]
    return "\n".join(lines) + "\n"


@dataclass
class Fleet:
    """The container with localdc running, the unit installed, accounts logged in."""

    box: Container
    keyring: KeyRing
    code: str
    user_ids: dict[str, int]

    # -- files inside the container

    def write(self, inner: str, text: str, mode: int = 0o644) -> None:
        path = self.box.path(inner)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    def write_config(self, *names: str) -> None:
        self.write(CONFIG, config_toml(*names))

    def dropin(self, name: str, text: str | None) -> None:
        """Add (or with None remove) a drop-in, then daemon-reload."""
        path = self.box.path(f"{DROPINS}/{name}")
        if text is None:
            path.unlink(missing_ok=True)
        else:
            self.write(f"{DROPINS}/{name}", text)
        self.box.systemctl("daemon-reload")

    # -- the unit

    def show(self, *props: str) -> dict[str, str]:
        return self.box.show(SERVICE, *props)

    def main_pid(self) -> int:
        return int(self.show("MainPID")["MainPID"])

    def journal(self, invocation: str | None = None) -> str:
        """The unit's journal: every run, or one run's (the daemon's lines and systemd's)."""
        if invocation is None:
            return self.box.journal(SERVICE)
        return self.box.run("journalctl", "--no-pager", "-o", "cat",
                            f"_SYSTEMD_INVOCATION_ID={invocation}", "+",
                            f"INVOCATION_ID={invocation}").stdout

    def start(self) -> str:
        """Start (or restart) the unit from scratch; returns its invocation id."""
        self.box.systemctl("reset-failed", SERVICE, check=False)
        self.box.systemctl("restart", SERVICE)
        return self.show("InvocationID")["InvocationID"]

    async def wait_state(self, active: str, sub: str, timeout: float = 30.0) -> None:
        def reached() -> bool:
            state = self.show("ActiveState", "SubState")
            return (state["ActiveState"], state["SubState"]) == (active, sub)
        await until(reached, timeout, f"{SERVICE} {active} ({sub})")

    # -- peers inside the container

    def http(self, url: str, body: dict[str, Any] | None = None) -> Any:
        argv = [str(Path(sys.executable)), "-I", "-c", _HTTP, url]
        if body is not None:
            argv.append(json.dumps(body))
        return json.loads(self.box.run(*argv, timeout=20).stdout)

    def status(self) -> dict[str, str]:
        """Account -> state from the daemon's /status (served by aiohttp in the sandbox)."""
        proc = self.box.run(str(Path(sys.executable)), "-I", "-c", _HTTP, STATUS, check=False)
        if proc.returncode != 0:
            return {}
        return {a["account"]: a["state"] for a in json.loads(proc.stdout)["accounts"]}

    async def wait_connected(self, *names: str, timeout: float = 30.0) -> None:
        await until(
            lambda: all(self.status().get(n) == "connected" for n in names), timeout,
            f"{', '.join(names)} connected")

    def counters(self, name: str) -> dict[str, Any]:
        counters: dict[str, Any] = self.http(f"{CONTROL}/counters?user_id={self.user_ids[name]}")
        return counters

    def connections(self, name: str) -> int:
        return int(self.counters(name)["connections"])

    def heartbeats(self, name: str) -> int:
        return int(self.counters(name)["requests"].get("updates.getState", 0))

    async def more_heartbeats(self, name: str, n: int, timeout: float = 30.0) -> None:
        start = self.heartbeats(name)
        await until(lambda: self.heartbeats(name) >= start + n, timeout,
                                 f"{n} more heartbeats from {name}")

    # -- the store, read from a copy (the service's files stay untouched)

    async def stored_session(self, name: str, tmp: Path) -> Any:
        copy = tmp / "state-copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(self.box.path(STATE), copy)
        copy.chmod(0o700)
        (copy / "tgdaemon.lock").unlink(missing_ok=True)
        async with await Store.open(copy, self.keyring) as store:
            return await store.load_session(name)


def config_toml(*names: str) -> str:
    """The daemon's config inside the container: localdc's two DCs, key from the credential,
    state directory from the unit's ``TGDAEMON_STATE_DIR``."""
    return daemon_config_toml(
        servers={1: [f"127.0.0.1:{LOCALDC_PORT}"], 2: [f"127.0.0.1:{LOCALDC_PORT + 1}"]},
        rsa_files=[Path("/etc/tgdaemon/localdc_rsa.pem")],
        accounts=[{"name": n, "phone": phone_for(n)} for n in names],
        daemon={"http_listen": "127.0.0.1:9464", "connect_rate": 0.0, "drain_timeout": 5.0},
        policy={"heartbeat_interval": 0.5, "stale_after": 5.0, "connect_timeout": 3.0,
                "request_timeout": 3.0, "backoff_base": 0.1, "backoff_cap": 0.5})


def start_localdc(box: Container) -> dict[str, Any]:
    box.run("systemd-run", "--quiet", "--unit=tgd-localdc", "--property=Type=exec", str(TGDAEMON),
            "localdc", f"--port={LOCALDC_PORT}", "--dcs=2", f"--state-dir={LOCALDC_STATE}",
            f"--info-file={LOCALDC_STATE}/info.json", "--control-port=4480")
    info_file = box.path(f"{LOCALDC_STATE}/info.json")
    box_wait(info_file.exists, 30, "localdc info file")
    info: dict[str, Any] = json.loads(info_file.read_text())
    return info


def box_wait(predicate: Any, timeout: float, what: str) -> None:
    """Synchronous condition wait for the module fixture (no event loop there)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.05)


def cli_login(fleet: Fleet, name: str) -> str:
    """``tgdaemon login`` as systemd/README.md has operators run it: the service's dynamic
    user, its state directory and its (encrypted) credential; the code typed on stdin."""
    proc = fleet.box.run(
        "systemd-run", "--quiet", "--pipe", "--wait", "--collect", "--property=DynamicUser=yes",
        "--property=User=tgdaemon", "--property=StateDirectory=tgdaemon",
        "--property=StateDirectoryMode=0700", "--setenv=TGDAEMON_STATE_DIR=/var/lib/tgdaemon",
        f"--property=LoadCredentialEncrypted={CREDENTIAL_NAME}:{ENCRYPTED_KEY}",
        *(f"--property={setting}" for setting in sandbox_binds(paths_to_bind())),
        str(TGDAEMON), "login", name, "--config", CONFIG, input=fleet.code + "\n", timeout=60)
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def box() -> Iterator[Container]:
    try:
        with booted(container_binds(paths_to_bind())) as container:
            yield container
    except ContainerUnavailable as exc:
        pytest.skip(f"systemd cannot boot in a container here: {exc}")


@pytest.fixture(scope="module")
def fleet(box: Container, tmp_path_factory: pytest.TempPathFactory) -> Fleet:
    # Nothing the host enabled (PostgreSQL, Prometheus, proxies...) runs in the container.
    active = box.systemctl("is-active", *MASKED, check=False).stdout.split()
    assert set(active) <= {"inactive"}, dict(zip(MASKED, active, strict=True))
    info = start_localdc(box)
    keyring = generate_keyring()
    fleet = Fleet(box, keyring, str(info["code"]), {})
    fleet.write("/etc/tgdaemon/localdc_rsa.pem", str(info["rsa_public_key"]))
    fleet.write_config("alice", "bob")
    # The key: plain (root-only) for the LoadCredential= test, and encrypted with the
    # container's host key for the shipped LoadCredentialEncrypted= line.
    write_key_file(box.path(PLAIN_KEY), keyring)
    box.path("/etc/credstore.encrypted").mkdir(mode=0o700)
    box.run("systemd-creds", "encrypt", f"--name={CREDENTIAL_NAME}", "--with-key=host",
            PLAIN_KEY, ENCRYPTED_KEY)
    shutil.copy(UNIT, box.path(f"/etc/systemd/system/{SERVICE}"))
    fleet.dropin("10-venv.conf", venv_dropin(paths_to_bind()))
    names = ("alice", "bob")
    with ThreadPoolExecutor(len(names)) as pool:  # two interpreters start at once
        logins = "".join(pool.map(lambda name: cli_login(fleet, name), names))
    for name in names:
        assert f"logged in {name}" in logins, logins
        user = fleet.http(f"{CONTROL}/user", {"phone": phone_for(name)})["user_id"]
        assert isinstance(user, int)
        fleet.user_ids[name] = user
    assert secrets_found(logins, phones=[phone_for(n) for n in fleet.user_ids],
                         codes=[fleet.code], keyring=keyring, auth_keys=[]) == []
    fleet.write_config("alice")
    return fleet


async def running(fleet: Fleet, *names: str) -> str:
    """The unit running (started if it is not) with ``names`` connected; its invocation id."""
    state = fleet.show("ActiveState", "InvocationID")
    if state["ActiveState"] != "active":
        fleet.write_config(*names)
        fleet.start()
        state = fleet.show("ActiveState", "InvocationID")
    await fleet.wait_connected(*names)
    return state["InvocationID"]


# -- tests -------------------------------------------------------------------------------------


def proc_status(fleet: Fleet, pid: int) -> dict[str, str]:
    out = fleet.box.run("cat", f"/proc/{pid}/status").stdout
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


async def test_notify_start_as_dynamic_user_in_the_sandbox(fleet: Fleet) -> None:
    fleet.write_config("alice")
    # Type=notify: systemd runs ExecStartPost= once the unit is started, i.e. after READY=1;
    # the probe there must find the daemon ready (store open, workers started, HTTP up). A
    # Type=simple unit would run it right after exec, before the interpreter even listened.
    fleet.dropin("15-probe.conf", f"[Service]\nExecStartPost={sys.executable} -I -c "
                 f"\"import urllib.request as u; print('probe', "
                 f"u.urlopen('{READYZ}', timeout=5).status)\"\n")
    try:
        invocation = fleet.start()  # `systemctl restart` returns once the unit is active
    finally:
        fleet.dropin("15-probe.conf", None)
    props = fleet.show("ActiveState", "SubState", "StatusText", "MainPID")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert "probe 200" in fleet.journal(invocation).splitlines()
    # STATUS= reaches systemd through NOTIFY_SOCKET from inside the sandbox.
    assert re.fullmatch(r"1 account: 1 [a-z_]+", props["StatusText"]), props["StatusText"]
    await fleet.wait_connected("alice")
    await until(lambda: fleet.show("StatusText")["StatusText"]
                             == "1 account: 1 connected", 15, "STATUS= 1 connected")

    # The master key came from the credential systemd decrypted for the unit.
    log = fleet.journal(invocation)
    assert f"master key from systemd credential /run/credentials/{SERVICE}/{CREDENTIAL_NAME}" \
        in log, log
    # DynamicUser=: an unprivileged uid from systemd's dynamic range, no capabilities, no new
    # privileges, a seccomp filter; the sandbox is really on.
    pid = int(props["MainPID"])
    status = proc_status(fleet, pid)
    uid = int(status["Uid"].split()[0])
    assert uid in DYNAMIC_UIDS, status["Uid"]
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapBnd"], 16) == 0
    assert status["NoNewPrivs"] == "1"
    assert status["Seccomp"] == "2"
    # StateDirectory=: /var/lib/tgdaemon -> private/tgdaemon, owned by that uid, 0700, with
    # the SQLite store in it (written through the sandbox: WAL and all).
    link = fleet.box.path("/var/lib/tgdaemon")
    assert link.is_symlink()
    assert str(link.readlink()) == "private/tgdaemon"
    state = fleet.box.path(STATE)
    assert state.stat().st_uid == uid
    assert state.stat().st_mode & 0o777 == 0o700
    db = state / "tgdaemon.sqlite3"
    assert db.stat().st_uid == uid
    assert db.stat().st_mode & 0o077 == 0
    # cryptg (a compiled extension) loaded under MemoryDenyWriteExecute=yes: Telethon would
    # silently fall back to slow pure-Python AES if it had not.
    maps = fleet.box.run("cat", f"/proc/{pid}/maps").stdout
    assert re.search(r"/cryptg/\S+\.so", maps), "cryptg is not loaded in the sandbox"


async def test_plain_load_credential(fleet: Fleet) -> None:
    """The README's alternative without systemd-creds: LoadCredential= of a root-only file."""
    await running(fleet, "alice")
    encrypted = fleet.box.path(ENCRYPTED_KEY)
    aside = encrypted.with_name("aside")
    encrypted.rename(aside)  # only the plain file can supply the key now
    fleet.dropin("20-plain-key.conf", "[Service]\nLoadCredentialEncrypted=\n"
                 f"LoadCredential={CREDENTIAL_NAME}:{PLAIN_KEY}\n")
    try:
        invocation = fleet.start()
        await fleet.wait_connected("alice")
        log = fleet.journal(invocation)
        assert f"master key from systemd credential /run/credentials/{SERVICE}/" \
               f"{CREDENTIAL_NAME}" in log, log
    finally:
        fleet.dropin("20-plain-key.conf", None)
        aside.rename(encrypted)


async def test_reload_keeps_connections(fleet: Fleet) -> None:
    invocation = await running(fleet, "alice")
    pid = fleet.main_pid()
    before = fleet.connections("alice")
    assert before >= 1

    # A broken file: rejected, the running config stays.
    fleet.write(CONFIG, config_toml("alice", "bob") + "\n[policy\n")
    fleet.box.systemctl("reload", SERVICE)
    await until(lambda: "reload rejected" in fleet.journal(invocation), 15,
                             "rejected reload logged")
    await fleet.more_heartbeats("alice", 2)
    assert fleet.show("ActiveState")["ActiveState"] == "active"

    # A good file adding bob: bob connects, alice keeps her one connection.
    fleet.write_config("alice", "bob")
    fleet.box.systemctl("reload", SERVICE)
    await fleet.wait_connected("alice", "bob")
    await fleet.more_heartbeats("alice", 2)
    assert fleet.connections("alice") == before, "alice reconnected on reload"
    assert fleet.connections("bob") >= 1
    assert fleet.main_pid() == pid
    props = fleet.show("ActiveState", "SubState", "NRestarts")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")


async def test_watchdog_restarts_a_blocked_daemon(fleet: Fleet) -> None:
    await running(fleet, "alice")
    # A short watchdog (and restart delay) for the test's speed; the daemon pings at half of
    # whatever WatchdogSec= says (WATCHDOG_USEC).
    fleet.dropin("30-watchdog.conf", f"[Service]\nWatchdogSec={WATCHDOG_SEC}s\nRestartSec=1s\n")
    try:
        invocation = fleet.start()
        assert fleet.show("WatchdogUSec")["WatchdogUSec"] == f"{WATCHDOG_SEC}s"
        await fleet.wait_connected("alice")
        pid = fleet.main_pid()
        restarts = int(fleet.show("NRestarts")["NRestarts"])
        # A healthy daemon pings in time: twice the watchdog period passes without a restart.
        await fleet.more_heartbeats("alice", 4 * WATCHDOG_SEC)
        assert fleet.main_pid() == pid
        assert int(fleet.show("NRestarts")["NRestarts"]) == restarts

        fleet.box.systemctl("kill", "--kill-who=main", "--signal=SIGSTOP", SERVICE)
        await until(
            lambda: int(fleet.show("NRestarts")["NRestarts"]) == restarts + 1
            and fleet.show("ActiveState")["ActiveState"] == "active", 40,
            "restart by the watchdog")
        assert fleet.main_pid() != pid
        log = fleet.journal(invocation)
        assert f"Watchdog timeout (limit {WATCHDOG_SEC}s)!" in log, log
        assert "Failed with result 'watchdog'" in log, log
        await fleet.wait_connected("alice")
    finally:
        fleet.dropin("30-watchdog.conf", None)


async def test_bad_config_fails_without_restarting(fleet: Fleet) -> None:
    await running(fleet, "alice")
    fleet.write(CONFIG, config_toml("alice") + "\n[policy\n")
    try:
        fleet.box.systemctl("restart", SERVICE, check=False)
        # RestartPreventExitStatus=78: straight to failed, no auto-restart pending.
        await fleet.wait_state("failed", "failed")
        props = fleet.show("Result", "ExecMainCode", "ExecMainStatus", "InvocationID")
        assert props["Result"] == "exit-code"
        assert int(props["ExecMainStatus"]) == ConfigError.exit_code == 78
        lines = [line for line in fleet.journal(props["InvocationID"]).splitlines()
                 if line.startswith("tgdaemon:")]
        assert len(lines) == 1, lines
        assert lines[0].startswith("tgdaemon: error:"), lines
        assert "Traceback" not in fleet.journal(props["InvocationID"])
    finally:
        fleet.write_config("alice")
        fleet.box.systemctl("reset-failed", SERVICE, check=False)


async def push_three(fleet: Fleet, name: str) -> None:
    """Three new messages for ``name``, delivered to the daemon and past two heartbeats."""
    pushed = int(fleet.counters(name)["updates_pushed"])
    for i in range(3):
        fleet.http(f"{CONTROL}/push", {"user_id": fleet.user_ids[name], "text": f"msg {i}"})
    await until(lambda: int(fleet.counters(name)["updates_pushed"]) >= pushed + 3,
                             15, "updates delivered to the daemon")
    await fleet.more_heartbeats(name, 2)


async def test_stop_flushes_sessions(fleet: Fleet, tmp_path: Path) -> None:
    if fleet.show("ActiveState")["ActiveState"] == "active":
        fleet.box.systemctl("stop", SERVICE)
    before = await fleet.stored_session("alice", tmp_path)
    assert before is not None
    assert before.pts is not None
    invocation = await running(fleet, "alice")

    # Three new messages move alice's pts; an update-state-only change is written at most
    # every UPDATE_STATE_INTERVAL (300 s), so it is the stop that writes it.
    await push_three(fleet, "alice")
    fleet.box.systemctl("stop", SERVICE)
    props = fleet.show("ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert props["ActiveState"] == "inactive", props
    assert props["Result"] == "success", props
    assert props["ExecMainStatus"] == "0", props
    after = await fleet.stored_session("alice", tmp_path)
    assert after is not None
    assert after.pts == before.pts + 3, (before.pts, after.pts)
    assert after.auth_key == before.auth_key
    log = fleet.journal(invocation)
    assert "stopping: draining workers" in log, log
    assert "could not be flushed" not in log, log

    # The contrast: the same three messages, then SIGKILL instead of a stop: nothing written.
    await running(fleet, "alice")
    await push_three(fleet, "alice")
    fleet.box.systemctl("kill", "--signal=SIGKILL", SERVICE)
    await fleet.wait_state("activating", "auto-restart")  # Restart=on-failure, in 5 s...
    fleet.box.systemctl("stop", SERVICE)  # ...cancelled
    killed = await fleet.stored_session("alice", tmp_path)
    assert killed is not None
    assert killed.pts == after.pts, (after.pts, killed.pts)

    # Nothing secret reached the journal in any run of the unit.
    leaks = secrets_found(fleet.journal(), phones=[phone_for(n) for n in fleet.user_ids],
                          codes=[fleet.code], keyring=fleet.keyring, auth_keys=[after.auth_key])
    assert not leaks, leaks
