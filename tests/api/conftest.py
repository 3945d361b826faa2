"""The daemon as a real process (``python -m tgdaemon run``) with the account API enabled,
two logged-in accounts (alice, bob) and one never logged in (carol, parked), against an
in-process localdc; API clients with their own tokens."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import ConfigFactory, LoginFn, phone_for, wait_for_condition
from tests.daemon.test_process import DaemonProcess, daemon_env, free_port
from tgdaemon.localdc import LocalDC


@dataclass
class ApiDaemon:
    process: DaemonProcess
    port: int
    config: Path
    tokens: dict[str, str]  # client name -> token
    user_ids: dict[str, int]  # account -> localdc user id
    unix_socket: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self, client: str = "ops", **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[client]}", **extra}

    async def request(self, method: str, path: str, client: str | None = "ops",
                      headers: dict[str, str] | None = None, **kw: Any
                      ) -> tuple[int, dict[str, Any], Any]:
        hdrs = dict(headers or {})
        if client is not None:
            hdrs.update(self.headers(client))
        async with aiohttp.ClientSession() as http, http.request(
                method, self.url + path, headers=hdrs,
                timeout=aiohttp.ClientTimeout(total=30), **kw) as r:
            body = await r.json(content_type=None)
            return r.status, dict(r.headers), body

    async def states(self) -> dict[str, str]:
        status, _h, body = await self.request("GET", "/v1/accounts")
        assert status == 200, body
        return {a["account"]: a["state"] for a in body["accounts"]}


CLIENTS = {
    # name: (accounts, methods)
    "ops": (["*"], "all"),
    "alice-app": (["alice"], "all"),
    "reader": (["*"], "read-only"),
}


def api_section(tmp_path: Path, tokens: dict[str, str], extra: str = "") -> str:
    lines = ["", "[api]", extra]
    for name, (accounts, methods) in CLIENTS.items():
        token_file = tmp_path / f"{name}.token"
        token_file.write_text(tokens[name] + "\n")
        os.chmod(token_file, 0o600)
        methods_toml = f'"{methods}"' if isinstance(methods, str) else str(methods)
        lines += ["[[api.clients]]", f'name = "{name}"', f'token_file = "{token_file}"',
                  "accounts = [" + ", ".join(f'"{a}"' for a in accounts) + "]",
                  f"methods = {methods_toml}"]
    return "\n".join(lines) + "\n"


async def start_api_daemon(config: Path) -> DaemonProcess:
    return await DaemonProcess.start(config, daemon_env())


@contextlib.asynccontextmanager
async def open_api_daemon(tmp_path: Path, make_config: ConfigFactory, login_account: LoginFn,
                          *, daemon: dict[str, Any] | None = None,
                          policy: dict[str, Any] | None = None) -> AsyncIterator[ApiDaemon]:
    """The daemon with alice and bob logged in and carol parked; ``daemon``/``policy``
    override the fixture's settings."""
    port = free_port()
    config = make_config([{"name": n, "phone": phone_for(n)} for n in ("alice", "bob", "carol")],
                         # per-account latency histograms (opt-in)
                         daemon={"http_listen": f"127.0.0.1:{port}", "log_level": "debug",
                                 "metrics_histograms": "account", **(daemon or {})},
                         policy=policy)
    user_ids = {name: await login_account(config, name) for name in ("alice", "bob")}
    tokens = {name: secrets.token_urlsafe(24) for name in CLIENTS}
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="tgdapi-"))
    unix_socket = sock_dir / "api.sock"
    with config.path.open("a") as f:
        f.write(api_section(tmp_path, tokens,
                            f'updates_buffer = 50\nunix_socket = "{unix_socket}"'))
    process = await start_api_daemon(config.path)
    d = ApiDaemon(process, port, config.path, tokens, user_ids, unix_socket)
    try:
        async def up() -> bool:
            with contextlib.suppress(aiohttp.ClientError, AssertionError):
                states = await d.states()
                return states.get("alice") == states.get("bob") == "connected" \
                    and states.get("carol") == "needs_login"
            return False

        await wait_for_condition(up, 30, "alice and bob connected, carol parked")
        yield d
    finally:
        await d.process.kill()
        shutil.rmtree(sock_dir, ignore_errors=True)
        for p in {process, d.process}:
            assert "Traceback" not in p.log, p.tail()


@pytest.fixture
async def api_daemon(tmp_path: Path, make_config: ConfigFactory, login_account: LoginFn,
                     localdc: LocalDC) -> AsyncIterator[ApiDaemon]:
    async with open_api_daemon(tmp_path, make_config, login_account) as d:
        yield d
