"""``/v1/accounts/{name}/sessions`` and ``tgdaemon sessions``: the operator looks at and ends an
account's other sessions through the daemon, which owns the account's key (the daemon as a
real process, localdc in the test, a stock Telethon client as the foreign session)."""

from __future__ import annotations

import asyncio
import sys

import pytest
from telethon import errors, functions

from tests.api.conftest import ApiDaemon
from tests.conftest import phone_for
from tests.daemon.test_process import daemon_env
from tgdaemon.localdc.testing import login, make_client


async def _cli(d: ApiDaemon, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tgdaemon", "sessions", *args, "-c", str(d.config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=daemon_env())
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_list_and_terminate_sessions_through_the_daemon(api_daemon: ApiDaemon,
                                                             localdc) -> None:
    d = api_daemon
    phone = make_client(localdc, device_model="Stranger Phone")
    try:
        await login(phone, localdc, phone_for("alice"))
        status, _h, body = await d.request("GET", "/v1/accounts/alice/sessions")
        assert status == 200, body
        sessions = body["sessions"]
        assert len(sessions) == 2
        ours = [s for s in sessions if s["current"]]
        assert len(ours) == 1
        other = next(s for s in sessions if not s["current"])
        assert other["device"].startswith("Stranger Phone")
        assert "ip" not in other  # security.log_ip is off
        # read-only clients may list but not terminate; alice's app may not touch bob
        status, _h, _b = await d.request("GET", "/v1/accounts/alice/sessions", client="reader")
        assert status == 200
        status, _h, body = await d.request("POST", "/v1/accounts/alice/sessions/terminate",
                                           client="reader", json={"allOthers": True})
        assert status == 403, body
        status, _h, _b = await d.request("GET", "/v1/accounts/bob/sessions",
                                         client="alice-app")
        assert status == 403
        status, _h, body = await d.request("POST", "/v1/accounts/alice/sessions/terminate",
                                           json={"hash": "x", "allOthers": True})
        assert status == 400, body

        code, out, err = await _cli(d, "alice")
        assert code == 0, err
        assert "Stranger Phone" in out
        assert other["hash"] in out
        code, out, err = await _cli(d, "alice", "--terminate", other["hash"])
        assert code == 0, err
        with pytest.raises(errors.AuthKeyUnregisteredError):
            await phone(functions.updates.GetStateRequest())
        status, _h, body = await d.request("GET", "/v1/accounts/alice/sessions")
        assert [s["current"] for s in body["sessions"]] == [True]
        assert (await d.states())["alice"] == "connected"
        code, _out, err = await _cli(d, "alice", "--terminate", other["hash"])
        assert code != 0
        assert err.startswith("tgdaemon: error: API answered 404")
        assert "Traceback" not in err
    finally:
        await phone.disconnect()


async def test_young_session_refusal_is_403_and_the_account_stays_connected(
        api_daemon: ApiDaemon, localdc) -> None:
    d = api_daemon
    localdc.world.fresh_reset_after = 3600
    status, _h, body = await d.request("POST", "/v1/accounts/bob/sessions/terminate",
                                       json={"allOthers": True})
    assert status == 403, body
    assert body["rpcError"] == "FRESH_RESET_AUTHORISATION_FORBIDDEN"
    assert (await d.states())["bob"] == "connected"
