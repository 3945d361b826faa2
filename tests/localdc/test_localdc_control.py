"""The HTTP/JSON control API and the CLI, driven from other processes."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import pytest
from telethon import errors, events
from telethon.tl import functions, types

from tgdaemon.localdc import LocalDC
from tgdaemon.localdc.testing import client_for_info, login

GET_SELF = functions.users.GetUsersRequest([types.InputUserSelf()])

# Runs in a separate Python process: drives the control API with the stdlib only.
_DRIVER = r"""
import json, sys, urllib.request
base = sys.argv[1]
def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)
info = call("GET", "/info")
fid = call("POST", "/faults", {"kind": "rpc_error", "method": "users.getUsers",
                               "error": "FLOOD_WAIT_77", "times": 1})["id"]
print(json.dumps({"dcs": len(info["dcs"]), "fault": fid,
                  "faults": call("GET", "/faults")["faults"],
                  "counters": call("GET", "/counters?dc_id=1")}))
"""


async def _run(*args: str, timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def test_control_endpoint_from_another_process(tmp_path, isolated_telethon, clients,
                                                     phone):
    async with LocalDC(tmp_path / "dc", dcs=2, control_port=0) as dc:
        assert dc.control_url is not None
        assert dc.control_url.startswith("http://127.0.0.1:")
        client = clients(dc, flood_sleep_threshold=0)
        await login(client, dc, phone)
        rc, out, err = await _run(sys.executable, "-c", _DRIVER, dc.control_url)
        assert rc == 0, err
        result = json.loads(out)
        assert result["dcs"] == 2
        assert result["faults"][str(result["fault"])]["error"] == "FLOOD_WAIT_77"
        assert result["counters"]["key_exchanges"] == 1
        with pytest.raises(errors.FloodWaitError) as info:
            await client(GET_SELF)
        assert info.value.seconds == 77
        await client.disconnect()


def _read_info(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


async def _wait_file(path: Path, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while (info := _read_info(path)) is None:
        if time.monotonic() > deadline:
            raise AssertionError("info file not written in time")
        await asyncio.sleep(0.05)
    return info


async def _post(url: str, body: dict) -> dict:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        resp.raise_for_status()
        return await resp.json()


async def test_cli_serves_until_sigterm(tmp_path, isolated_telethon, phone):
    info_file = tmp_path / "run" / "info.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon.localdc", "--port", "0", "--dcs", "2",
        "--state-dir", str(tmp_path / "state"), "--info-file", str(info_file),
        "--control-port", "0", "--code", "54321",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    client = None
    try:
        info = await _wait_file(info_file)
        assert [d["id"] for d in info["dcs"]] == [1, 2]
        assert all(d["host"] == "127.0.0.1" for d in info["dcs"])
        assert info["code"] == "54321"
        assert "BEGIN RSA PUBLIC KEY" in info["rsa_public_key"]
        client = client_for_info(info, 1)
        await client.connect()
        await client.send_code_request(phone)
        code = (await _post(info["control_url"] + "/code", {"phone": phone}))["code"]
        assert code == "54321"
        me = await client.sign_in(phone, code)
        got: list[str] = []
        client.add_event_handler(lambda ev: got.append(ev.raw_text), events.NewMessage())
        await _post(info["control_url"] + "/push", {"user_id": me.id, "text": "via control"})
        cid = (await _post(info["control_url"] + "/channel",
                           {"title": "news", "members": [me.id]}))["channel_id"]
        await _post(info["control_url"] + "/channel/post", {"channel_id": cid, "text": "post"})
        deadline = time.monotonic() + 10
        while got != ["via control", "post"]:
            assert time.monotonic() < deadline, f"pushed updates not received: {got}"
            await asyncio.sleep(0.02)
        await client.disconnect()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0
        assert "NOT Telegram" in err.decode()
        assert phone not in err.decode()
        assert "54321" not in err.decode()
    finally:
        if client is not None:
            await client.disconnect()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
