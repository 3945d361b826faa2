"""Shared fixtures: a running local DC, a temp state dir, a key ring, daemon configs.

Everything talks real MTProto over TCP on 127.0.0.1 to ``tgdaemon.localdc`` with stock
Telethon; nothing here mocks Telethon.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tgdaemon.config import Config, load_config
from tgdaemon.crypto import KeyRing, generate_keyring, write_key_file
from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import daemon_config_toml, telethon_isolation
from tgdaemon.store import Store

WaitUntil = Callable[..., Awaitable[None]]

pytest_plugins = ["tests.timeouts"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` keeps the groups of tests/parallel.py on one worker each."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.parallel import make_scheduler

    return make_scheduler(config, log)


async def wait_for_condition(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    message: str = "condition",
    interval: float = 0.02,
) -> None:
    """Poll a condition (sync or async) until it holds; fail on timeout (never a bare sleep).
    A predicate that starts processes wants a longer ``interval``."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not met within {timeout}s")
        await asyncio.sleep(interval)


@pytest.fixture(autouse=True)
def root_log_level() -> Iterator[None]:
    """An in-process daemon sets the root logger's level from its config (``log_level``, on
    a reload too): restored after each test. Left at debug, the next tests in the process ran
    with pytest's log capture keeping every debug record and the objects in its arguments
    (test_reaper's abandoned connections stayed alive after test_lifecycle_live's reload)."""
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture
def wait_until() -> WaitUntil:
    return wait_for_condition


Spawn = Callable[..., subprocess.Popen[str]]


@pytest.fixture
def children() -> Iterator[Spawn]:
    """``Popen`` (text pipes) whose children are killed and reaped when the test ends, passed
    or failed: a failing assertion between a spawn and its kill leaves no process behind."""
    procs: list[subprocess.Popen[str]] = []

    def spawn(args: list[str], **kw: Any) -> subprocess.Popen[str]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, **kw)
        procs.append(proc)
        return proc

    yield spawn
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=20)  # reaps it, closes its pipes


@pytest.fixture
def isolated_telethon() -> Iterator[None]:
    """Telethon's trusted RSA keys and help.getConfig cache are process-wide: reset both."""
    with telethon_isolation():
        yield


@pytest.fixture
async def localdc(tmp_path: Path, isolated_telethon: None) -> AsyncIterator[LocalDC]:
    async with LocalDC(tmp_path / "localdc", dcs=2) as dc:
        yield dc


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def keyring() -> KeyRing:
    return generate_keyring()


@pytest.fixture
def ring(keyring: KeyRing) -> KeyRing:
    """The store and session tests' name for the key ring."""
    return keyring


@pytest.fixture
async def store(state_dir: Path, keyring: KeyRing) -> AsyncIterator[Store]:
    """An open store in the temp state dir, closed (writes drained) at teardown."""
    s = await Store.open(state_dir, keyring)
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
def key_file(tmp_path: Path, keyring: KeyRing) -> Path:
    path = tmp_path / "master.key"
    write_key_file(path, keyring)
    return path


def render_config(
    *,
    localdc: LocalDC,
    state_dir: Path,
    key_file: Path,
    rsa_file: Path,
    accounts: list[dict[str, Any]],
    policy: dict[str, Any] | None = None,
    daemon: dict[str, Any] | None = None,
    servers: dict[int, list[str]] | None = None,
    security: dict[str, Any] | None = None,
) -> str:
    """A complete TOML config pointing at ``localdc``; tests override what they exercise."""
    if servers is None:
        servers = {dc: [f"{h}:{p}"] for dc, (h, p) in localdc.addresses.items()}
    daemon_cfg = {
        "state_dir": state_dir,
        "master_key_file": key_file,
        "http_listen": "127.0.0.1:0",
        "log_level": "debug",
        "connect_rate": 0.0,
        "drain_timeout": 5.0,
        **(daemon or {}),
    }
    policy_cfg = {
        "heartbeat_interval": 0.5,
        "stale_after": 5.0,
        "connect_timeout": 3.0,
        "request_timeout": 3.0,
        "backoff_base": 0.1,
        "backoff_cap": 0.5,
        **(policy or {}),
    }
    return daemon_config_toml(servers=servers, rsa_files=[rsa_file], accounts=accounts,
                              daemon=daemon_cfg, policy=policy_cfg, security=security)


ConfigFactory = Callable[..., Config]


@pytest.fixture
def make_config(
    tmp_path: Path, localdc: LocalDC, state_dir: Path, key_file: Path
) -> ConfigFactory:
    """Write a config file for ``localdc`` and load it through the real loader."""
    rsa_file = tmp_path / "localdc_rsa.pem"
    rsa_file.write_text(localdc.rsa_public_pem)
    path = tmp_path / "tgdaemon.toml"

    def factory(accounts: list[dict[str, Any]], **kw: Any) -> Config:
        path.write_text(render_config(localdc=localdc, state_dir=state_dir, key_file=key_file,
                                      rsa_file=rsa_file, accounts=accounts, **kw))
        return load_config(path)

    return factory


def phone_for(name: str) -> str:
    """A fake test number per account name (99966 is Telegram's test prefix)."""
    return "+99966" + str(10000 + sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 90000)


LoginFn = Callable[..., Awaitable[int]]


@pytest.fixture
def login_account(localdc: LocalDC) -> LoginFn:
    """Log an account in through the CLI's own login flow, answering its prompts."""
    from tgdaemon.cli import login

    async def do_login(config: Config, name: str, password: str | None = None) -> int:
        phone = config.account(name).phone or phone_for(name)

        def secret(prompt: str) -> str:
            if "password" in prompt.lower():
                assert password is not None, "account has 2FA but no password given"
                return password
            code = localdc.last_code(phone)
            assert code is not None
            return code

        return await login(config, name, prompt=lambda _p: phone, secret=secret)

    return do_login


SeedFn = Callable[[Config], Awaitable[None]]


@pytest.fixture
def seed_accounts(localdc: LocalDC, keyring: KeyRing) -> SeedFn:
    """Every account of a config as a login leaves it (a user on ``localdc`` with an auth key
    bound to it, the session in the daemon's store), without the login flow: for tests about
    something else than logging in, that need many accounts (``login_account`` tests the
    flow; 50 logins took ~10 s on a loaded machine)."""
    from bench.seed import seed_sessions
    from tgdaemon.localdc.crypto import key_id_of
    from tgdaemon.localdc.store import AuthKeyRecord
    from tgdaemon.store import SessionData

    async def seed(config: Config) -> None:
        dc_id = 1
        host, port = localdc.addresses[dc_id]
        now = int(time.time())
        sessions = []
        for account in config.accounts:
            user = localdc.store.get_or_create_user(account.phone or phone_for(account.name),
                                                    dc_id)
            key = os.urandom(256)
            localdc.store.put_auth_key(AuthKeyRecord(key_id_of(key), dc_id, key, user.id))
            sessions.append((account.name, SessionData(
                dc_id, host, port, auth_key=key, user_id=user.id, pts=user.pts, qts=0,
                date=now, seq=0)))
        await seed_sessions(config.daemon.state_dir, keyring, sessions)

    return seed


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """One real PostgreSQL server for the session (tests/postgres.py); each test that needs
    it takes a database of its own from ``pg_url``."""
    from tests.postgres import PostgresServer, available

    if not available():
        pytest.skip("PostgreSQL binaries missing (scripts/install-system-deps.sh installs them)")
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture
def pg_url(postgres: Any, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's PostgreSQL server."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    return str(postgres.create_database(f"{name}_{id(request) % 100000}"))
