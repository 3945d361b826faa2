"""The daemon as systemd runs it: ``python -m tgdaemon run`` in a subprocess, a real
NOTIFY_SOCKET and WATCHDOG_USEC, real signals. The local DC runs in the test process.

Every run ends with SIGTERM and a checked exit code, and the daemon's whole stderr (debug
level) plus the CLI login output are searched for secrets at the end.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import phone_for, wait_for_condition
from tests.leakscan import secrets_found
from tgdaemon.crypto import load_keyring
from tgdaemon.exceptions import StateLockedError
from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import API_HASH
from tgdaemon.store import Store

WATCHDOG_USEC = 2_000_000
STATUS_RE = re.compile(r"\d+ accounts?: (none|\d+ [a-z_]+(, \d+ [a-z_]+)*)")
#: Environment a systemd service would not inherit from the test runner.
_SCRUBBED = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "CREDENTIALS_DIRECTORY",
             "LISTEN_FDS", "LISTEN_PID", "TGDAEMON_CONFIG", "TGDAEMON_MASTER_KEY",
             "TGDAEMON_STATE_DIR")


@pytest.fixture
async def localdc(tmp_path: Path, isolated_telethon: None) -> AsyncIterator[LocalDC]:
    """Overrides the shared fixture: a random login code per request, so the secret check
    below looks for a code that cannot occur by accident."""
    async with LocalDC(tmp_path / "localdc", dcs=2, code=None) as dc:
        yield dc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def daemon_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update(extra)
    return env


# -- sd_notify listener ------------------------------------------------------------------------


@dataclass(frozen=True)
class Notification:
    at: float  # time.monotonic() of receipt
    fields: Mapping[str, str]


@dataclass
class NotifyListener:
    """The receiving end of NOTIFY_SOCKET: an AF_UNIX datagram socket read by one task."""

    path: Path
    messages: list[Notification] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            try:
                text = data.decode("ascii")
            except UnicodeDecodeError:
                self.errors.append(f"non-ASCII datagram: {data!r}")
                continue
            fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
            self.messages.append(Notification(time.monotonic(), fields))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()

    def find(self, key: str, value: str | None = None, start: int = 0) -> int | None:
        """Index of the first message at or after ``start`` carrying ``key`` (= ``value``)."""
        for i in range(start, len(self.messages)):
            got = self.messages[i].fields.get(key)
            if got is not None and (value is None or got == value):
                return i
        return None

    async def wait(self, key: str, value: str | None = None, start: int = 0,
                   timeout: float = 15.0) -> int:
        await wait_for_condition(lambda: self.find(key, value, start) is not None, timeout,
                                 f"sd_notify {key}={value or '*'} (after message {start})")
        index = self.find(key, value, start)
        assert index is not None
        return index

    def statuses(self) -> list[str]:
        return [m.fields["STATUS"] for m in self.messages if "STATUS" in m.fields]


@pytest.fixture
def notify_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="tgdn-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def notify(notify_dir: Path) -> AsyncIterator[NotifyListener]:
    listener = NotifyListener(notify_dir / "notify.sock")
    listener.start()
    yield listener
    await listener.close()


# -- the daemon process ------------------------------------------------------------------------


class DaemonProcess:
    """``python -m tgdaemon run`` with its stderr collected line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._collect())

    @classmethod
    async def start(cls, config: Path, env: Mapping[str, str]) -> DaemonProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tgdaemon", "run", "--config", str(config),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env=dict(env))
        return cls(proc)

    async def _collect(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode("utf-8", "replace").rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def running(self) -> bool:
        return self.proc.returncode is None

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait_exit(self, timeout: float) -> int:
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            raise AssertionError(
                f"daemon still running after {timeout}s:\n{self.tail()}") from None
        await asyncio.wait_for(self._reader, 5)
        return code

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 5)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    async def wait_log(self, pattern: str, timeout: float = 10.0) -> None:
        await wait_for_condition(lambda: re.search(pattern, self.log) is not None, timeout,
                                 f"log line matching {pattern!r}")


@pytest.fixture
async def processes() -> AsyncIterator[list[DaemonProcess]]:
    """Every daemon a test starts; a test that fails midway still leaves none behind."""
    started: list[DaemonProcess] = []
    yield started
    for p in started:
        await p.kill()


async def start_daemon(processes: list[DaemonProcess], config: Path,
                       notify: NotifyListener) -> DaemonProcess:
    env = daemon_env(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(WATCHDOG_USEC))
    daemon = await DaemonProcess.start(config, env)
    processes.append(daemon)
    return daemon


async def http_status(port: int) -> dict[str, str]:
    """Account name -> state, from the daemon's /status endpoint."""
    async with aiohttp.ClientSession() as http, http.get(
            f"http://127.0.0.1:{port}/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
        assert r.status == 200
        body = await r.json()
    return {a["account"]: a["state"] for a in body["accounts"]}


async def states_are(port: int, expected: Mapping[str, str]) -> bool:
    try:
        states = await http_status(port)
    except aiohttp.ClientError:
        return False
    return all(states.get(k) == v for k, v in expected.items())


async def cli_login(config: Path, name: str, localdc: LocalDC, phone: str) -> tuple[str, str]:
    """``tgdaemon login NAME`` as an operator runs it (code typed on stdin, no tty);
    returns (the code it was sent, everything the command printed)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon", "login", name, "--config", str(config),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=daemon_env())
    try:
        await wait_for_condition(lambda: localdc.last_code(phone) is not None, 15,
                                 "login code sent")
        code = localdc.last_code(phone)
        assert code is not None
        out, err = await asyncio.wait_for(proc.communicate(f"{code}\n".encode()), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode() + err.decode()
    assert proc.returncode == 0, text
    return code, text


# -- secrets -----------------------------------------------------------------------------------


async def stored_auth_keys(key_file: Path, state_dir: Path,
                           names: list[str]) -> list[bytes]:
    keys = []
    async with await Store.open(state_dir, load_keyring(key_file=key_file)) as store:
        for name in names:
            data = await store.load_session(name)
            assert data is not None, f"{name} has no stored session"
            assert data.auth_key is not None
            keys.append(data.auth_key)
    return keys


def user_connections(localdc: LocalDC, user_id: int) -> int:
    """Server-side count of TCP connections that presented this user's auth key.

    (``connections_accepted`` is counted before a connection's key is known, so it is never
    attributed to a user: ``connections`` is the per-user count.)"""
    return int(localdc.counters(user_id=user_id)["connections"])


def heartbeats(localdc: LocalDC, user_id: int) -> int:
    return int(localdc.counters(user_id=user_id)["requests"].get("updates.getState", 0))


def accounts(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "phone": phone_for(n)} for n in names]


# -- tests -------------------------------------------------------------------------------------


async def test_config_error_at_start_exits_78_with_one_line(tmp_path, notify, processes):
    cases = {
        "syntax": "[daemon\nstate_dir = 1\n",
        "validation": '[daemon]\nstate_dir = "/nonexistent/x"\nlog_level = "loud"\n'
                      '[telegram]\napi_id = 1\napi_hash = "0123456789abcdef0123456789abcdef"\n',
    }
    for what, text in cases.items():
        path = tmp_path / f"{what}.toml"
        path.write_text(text)
        daemon = await start_daemon(processes, path, notify)
        code = await daemon.wait_exit(15)
        assert code == 78, f"{what}: exit {code}\n{daemon.log}"
        lines = [line for line in daemon.lines if line.strip()]
        assert len(lines) == 1, f"{what}: expected one line, got:\n{daemon.log}"
        assert lines[0].startswith("tgdaemon: error:"), lines[0]
        assert "Traceback" not in daemon.log
    assert notify.find("READY") is None, "READY=1 sent although the config was invalid"


async def test_ready_status_watchdog_and_sigterm(
        make_config, login_account, localdc, notify, processes, key_file, state_dir):
    port = free_port()
    config = make_config(accounts("alice", "bob"), daemon={"http_listen": f"127.0.0.1:{port}"})
    for name in ("alice", "bob"):
        await login_account(config, name)

    daemon = await start_daemon(processes, config.path, notify)
    ready = await notify.wait("READY", "1")
    # READY=1 comes after the store is open (the daemon holds its lock) and every worker was
    # started (both accounts are on the status line sent with it).
    assert STATUS_RE.fullmatch(notify.messages[ready].fields["STATUS"])
    assert notify.messages[ready].fields["STATUS"].startswith("2 accounts:")
    with pytest.raises(StateLockedError):
        await Store.open(state_dir, load_keyring(key_file=key_file))

    await wait_for_condition(lambda: "2 accounts: 2 connected" in notify.statuses(), 15,
                             "STATUS=2 accounts: 2 connected")
    assert await states_are(port, {"alice": "connected", "bob": "connected"})

    first = await notify.wait("WATCHDOG", "1", start=ready)
    await notify.wait("WATCHDOG", "1", start=first + 1)
    for _ in range(3):
        last = len(notify.messages) - 1
        await notify.wait("WATCHDOG", "1", start=last + 1, timeout=WATCHDOG_USEC / 1e6)
    pings = [m.at for m in notify.messages[first:] if m.fields.get("WATCHDOG") == "1"]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(gaps) >= 4
    # systemd recommends pinging at half of WATCHDOG_USEC: never late, not needlessly often.
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert 0.3 * WATCHDOG_USEC / 1e6 < sorted(gaps)[len(gaps) // 2] < 0.75 * WATCHDOG_USEC / 1e6

    assert not notify.errors
    for status in notify.statuses():
        assert STATUS_RE.fullmatch(status), status
    assert daemon.running()

    before_stop = len(notify.messages)
    stop_sent = time.monotonic()
    daemon.send(signal.SIGTERM)
    stopping = await notify.wait("STOPPING", "1", start=before_stop, timeout=10)
    code = await daemon.wait_exit(10)
    assert code == 0, daemon.tail()
    assert time.monotonic() - stop_sent < 10
    assert notify.find("READY", start=stopping) is None
    assert "Traceback" not in daemon.log


async def test_reload_broken_then_good_config_and_no_secrets_in_logs(
        make_config, login_account, localdc, notify, processes, keyring, key_file, state_dir):
    port = free_port()
    daemon_cfg = {"http_listen": f"127.0.0.1:{port}"}
    everyone = ("alice", "bob", "carol")
    config = make_config(accounts(*everyone), daemon=daemon_cfg)
    ids = {}
    codes = []
    for name in ("alice", "bob"):
        ids[name] = await login_account(config, name)
        code = localdc.last_code(phone_for(name))
        assert code is not None
        codes.append(code)
    # carol logs in through the real command, as an operator would before adding her.
    carol_code, cli_output = await cli_login(config.path, "carol", localdc, phone_for("carol"))
    codes.append(carol_code)
    assert "logged in carol" in cli_output
    carol_id = localdc.user_id(phone_for("carol"))
    assert carol_id is not None
    ids["carol"] = carol_id

    config = make_config(accounts("alice", "bob"), daemon=daemon_cfg)
    good_text = config.path.read_text()
    daemon = await start_daemon(processes, config.path, notify)
    await notify.wait("READY", "1")
    await wait_for_condition(lambda: states_are(port, {"alice": "connected", "bob": "connected"}),
                             15, "alice and bob connected")
    conns = {n: user_connections(localdc, ids[n]) for n in ("alice", "bob")}
    assert all(v >= 1 for v in conns.values()), conns

    # 1. A broken config: RELOADING=1, READY=1 again, the old config keeps running.
    config.path.write_text(good_text + "\n[policy\n")
    mark = len(notify.messages)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.send(signal.SIGHUP)
    reloading = await notify.wait("RELOADING", "1", start=mark)
    usec = int(notify.messages[reloading].fields["MONOTONIC_USEC"])
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    await notify.wait("READY", "1", start=reloading)
    await daemon.wait_log(r"reload rejected.*\n.*TOML syntax error")
    assert daemon.running()
    beats = heartbeats(localdc, ids["alice"])
    await wait_for_condition(lambda: heartbeats(localdc, ids["alice"]) >= beats + 2, 10,
                             "alice keeps heartbeating after the rejected reload")
    assert await states_are(port, {"alice": "connected", "bob": "connected"})
    assert {n: user_connections(localdc, ids[n]) for n in conns} == conns

    # 2. A good config adding carol: carol connects, alice and bob keep their connections.
    config = make_config(accounts(*everyone), daemon=daemon_cfg)
    mark = len(notify.messages)
    daemon.send(signal.SIGHUP)
    reloading = await notify.wait("RELOADING", "1", start=mark)
    await notify.wait("READY", "1", start=reloading)
    await wait_for_condition(
        lambda: states_are(port, {"alice": "connected", "bob": "connected",
                                  "carol": "connected"}), 15, "carol connected after reload")
    await wait_for_condition(lambda: "3 accounts: 3 connected" in notify.statuses(), 10,
                             "STATUS=3 accounts: 3 connected")
    beats = heartbeats(localdc, ids["alice"])
    await wait_for_condition(lambda: heartbeats(localdc, ids["alice"]) >= beats + 2, 10,
                             "alice heartbeats after the reload")
    assert {n: user_connections(localdc, ids[n]) for n in conns} == conns, \
        "an unchanged account reconnected on reload"
    assert user_connections(localdc, ids["carol"]) >= 1

    mark = len(notify.messages)
    daemon.send(signal.SIGTERM)
    await notify.wait("STOPPING", "1", start=mark, timeout=10)
    assert await daemon.wait_exit(10) == 0, daemon.tail()

    # 3. Nothing secret in anything the daemon or the CLI printed during the whole run.
    assert any("DEBUG" in line for line in daemon.lines), "debug logging was not on"
    auth_keys = await stored_auth_keys(key_file, state_dir, list(everyone))
    leaks = secrets_found(daemon.log + "\n" + cli_output,
                          phones=[phone_for(n) for n in everyone], codes=codes,
                          keyring=keyring, auth_keys=auth_keys)
    assert not leaks, f"secrets in the logs: {leaks}"


def test_secret_scanner_catches_every_form(keyring):
    """The scanner above must be able to fail: each secret form it claims to find, it finds."""
    auth_key = bytes(range(256))
    kw: dict[str, Any] = {"phones": ["+9996612345"], "codes": ["40713"], "keyring": keyring,
                          "auth_keys": [auth_key]}
    assert secrets_found("port 9464, msg 7240713123456789", **kw) == []
    for text, what in [("call +999 66 12345", "phone number #0"),
                       ("(999) 661-2345", "phone number #0"),
                       ("code=40713.", "login code #0"),
                       (f"k={auth_key[:16].hex()}", "auth key #0"),
                       (base64.b64encode(auth_key).decode(), "auth key #0"),
                       (keyring.active.secret.hex(), f"master key {keyring.active.key_id}"),
                       (base64.urlsafe_b64encode(keyring.active.secret).decode(),
                        f"master key {keyring.active.key_id}"),
                       (f"hash {API_HASH}", "api_hash")]:
        assert what in secrets_found(text, **kw), text
