"""The built-in status page in a real headless Chromium (Debian's package), driven over the
DevTools protocol with aiohttp's WebSocket client: it renders the daemon's accounts and shows a
state change made through the local DC without a reload."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import phone_for
from tgdaemon.daemon import Daemon
from tgdaemon.localdc import Fault
from tgdaemon.status import State

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (scripts/install-system-deps.sh installs it)")


class DevTools:
    """The few Chrome DevTools Protocol calls the test needs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self._ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads((await self._ws.receive(timeout=10)).data)
            if reply.get("id") == msg_id:
                assert "error" not in reply, reply
                return reply["result"]

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")


@pytest.fixture
async def browser(tmp_path: Path) -> AsyncIterator[str]:
    """A headless Chromium; yields its DevTools HTTP endpoint."""
    profile = tmp_path / "chromium-profile"
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
         f"--user-data-dir={profile}", "about:blank",
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        for _ in range(300):
            if port_file.exists() and port_file.read_text().strip():
                break
            assert proc.returncode is None, "chromium exited"
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)


async def test_status_page_renders_and_updates_live(
        make_config, login_account, localdc, wait_until, browser: str) -> None:
    config = make_config([{"name": "alice", "phone": phone_for("alice")},
                          {"name": "bob", "phone": phone_for("bob")}])
    await login_account(config, "alice")
    bob_id = await login_account(config, "bob")
    async with Daemon(config) as daemon:
        await wait_until(lambda: daemon.board.counts()[State.CONNECTED] == 2, 10, "connected")
        page_url = f"http://127.0.0.1:{daemon.http.port}/"
        async with aiohttp.ClientSession() as http:
            async with http.put(f"{browser}/json/new?{page_url}") as r:
                target = await r.json(content_type=None)
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                state_of = ("(n) => { const c = document.querySelector("
                            "`tr[data-account=\"${n}\"] td[data-field=\"state\"]`);"
                            " return c ? c.textContent.trim() : null; }")

                async def page_state(name: str) -> str | None:
                    return await tools.evaluate(f"({state_of})({json.dumps(name)})")

                async def shows(name: str, state: str) -> bool:
                    return await page_state(name) == state

                await wait_until(lambda: shows("alice", "connected"), 10, "alice rendered")
                await wait_until(lambda: shows("bob", "connected"), 10, "bob rendered")
                loads = await tools.evaluate("performance.getEntriesByType('navigation').length")

                localdc.inject(Fault("rpc_error", user_id=bob_id, method="*",
                                     error="SESSION_REVOKED"))
                await wait_until(lambda: shows("bob", "needs_login"), 10, "bob parked, live")
                assert await page_state("alice") == "connected"
                # the same document: no reload happened
                assert await tools.evaluate(
                    "performance.getEntriesByType('navigation').length") == loads
                shot = await tools.call("Page.captureScreenshot", format="png")
        ARTIFACTS.mkdir(exist_ok=True)
        png = base64.b64decode(shot["data"])
        assert png.startswith(b"\x89PNG")
        (ARTIFACTS / "status-page.png").write_bytes(png)
